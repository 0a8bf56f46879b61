"""Plain and compressed exports: round trips, strict loading into the original class, sizes, errors, checkpoints."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import torchvision
from safetensors import safe_open
from torch import nn

from lightning_scl.callbacks.scl import SparseConnectivityLearning
from lightning_scl.export import FORMATS, export_pruned, load_masked_checkpoint, load_pruned, load_shrunk, main
from lightning_scl.masking import inject_masks, iter_masks

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: one thread is faster


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU())
        self.head = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


class LeNet5(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


MODELS = {
    "mlp": (MLP, (1, 28, 28)),
    "lenet5": (LeNet5, (1, 28, 28)),
    "resnet18": (resnet18, (3, 32, 32)),
}


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Give BatchNorms trained-looking statistics (defaults would make every constant zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)


def masked(factory, density: float, granularity: str = "weight", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = factory()
    randomize_bn(model, seed)
    inject_masks(model, granularity=granularity)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, _, mask in iter_masks(model):
            keep = torch.rand(mask.mask.shape, generator=g) < density
            mask.mask.copy_(torch.where(keep, 1.0, -1.0))
    return model.eval()


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view for bit-for-bit comparison (distinguishes -0.0 from 0.0)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# ---------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("fmt", ["safetensors", "state_dict", "compressed"])
def test_round_trip_loads_strictly_into_original_class(tmp_path: Path, name: str, fmt: str) -> None:
    factory, shape = MODELS[name]
    model = masked(factory, density=0.1)
    path = export_pruned(model, tmp_path / f"{name}.{fmt}", format=fmt)

    state = load_pruned(path)
    fresh = factory().eval()
    assert list(state) == list(fresh.state_dict())  # same keys, same order
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    # the folded weights are exactly W * H(m)
    for layer_name, layer, mask in iter_masks(model):
        expected = layer.parametrizations.weight.original * (mask.mask > 0)
        assert torch.equal(state[f"{layer_name}.weight"], expected)


def test_plain_safetensors_is_also_readable_without_lightning_scl(tmp_path: Path) -> None:
    model = masked(MLP, 0.5)
    path = export_pruned(model, tmp_path / "mlp.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lightning_scl"])
    assert sorted(keys) == sorted(MLP().state_dict())
    assert meta["masked"] == ["head.weight", "net.1.weight", "net.3.weight"]
    assert 0.4 < meta["density"] < 0.6


def test_export_from_lightning_module_keeps_its_keys(tmp_path: Path) -> None:
    module = LitMLP()
    inject_masks(module)
    path = export_pruned(module, tmp_path / "lit.safetensors")
    LitMLP().load_state_dict(load_pruned(path), strict=True)
    assert sorted(load_pruned(path)) == ["model.1.bias", "model.1.weight", "model.3.bias", "model.3.weight"]


# ---------------------------------------------------------------------------------------------------- compressed


@pytest.mark.parametrize("density", [0.1, 0.02, 0.005])
def test_compressed_size_near_information_limit_and_bit_exact(tmp_path: Path, density: float) -> None:
    model = masked(MLP, density)
    plain_path = export_pruned(model, tmp_path / "plain.safetensors")
    path = export_pruned(model, tmp_path / "mlp.scl.safetensors", format="compressed")

    kept = connections = unmasked_bytes = 0
    for _, _, mask in iter_masks(model):
        kept += mask.kept()
        connections += mask.numel_connections
    masked_keys = {f"{n}.weight" for n, _, _ in iter_masks(model)}
    plain = load_pruned(plain_path)
    unmasked_bytes = sum(v.numel() * v.element_size() for k, v in plain.items() if k not in masked_keys)
    limit = kept * 4 + math.ceil(connections / 8) + unmasked_bytes
    size = path.stat().st_size
    assert size <= 1.15 * limit, (size, limit)
    assert size < plain_path.stat().st_size * (density + 0.15)

    restored = load_pruned(path)
    assert list(restored) == list(plain)
    for key in plain:
        assert restored[key].dtype == plain[key].dtype
        assert torch.equal(bits(restored[key]), bits(plain[key])), key


def test_compressed_at_2_percent_well_within_limit_for_lenet5(tmp_path: Path) -> None:
    model = masked(LeNet5, 0.02)
    path = export_pruned(model, tmp_path / "lenet5.scl.safetensors", format="compressed")
    kept = sum(m.kept() for _, _, m in iter_masks(model))
    connections = sum(m.numel_connections for _, _, m in iter_masks(model))
    biases = sum(p.numel() * 4 for n, p in LeNet5().named_parameters() if n.endswith("bias"))
    assert path.stat().st_size <= 1.15 * (kept * 4 + connections / 8 + biases)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_compressed_half_precision_values(tmp_path: Path, dtype: str) -> None:
    model = masked(MLP, 0.05)
    full = export_pruned(model, tmp_path / "full.scl.safetensors", format="compressed")
    half = export_pruned(model, tmp_path / "half.scl.safetensors", format="compressed", dtype=dtype)
    restored, reference = load_pruned(half), load_pruned(full)
    torch_dtype = getattr(torch, dtype)
    for key, value in reference.items():
        assert restored[key].dtype == value.dtype  # restored in the model's dtype...
        assert torch.equal(restored[key], value.to(torch_dtype).to(value.dtype))  # ...exactly the rounded values
    kept = sum(m.kept() for _, _, m in iter_masks(model))
    assert full.stat().st_size - half.stat().st_size >= 2 * kept


def test_channel_masks_store_one_bit_per_channel(tmp_path: Path) -> None:
    model = masked(LeNet5, 0.5, granularity="channel")
    path = export_pruned(model, tmp_path / "c.scl.safetensors", format="compressed")
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("__scl_bits__/features.0.weight").numel() == math.ceil(20 / 8)
    fresh = LeNet5().eval()
    fresh.load_state_dict(load_pruned(path))
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(fresh(x), model(x))


def test_corrupted_compressed_file_is_detected(tmp_path: Path) -> None:
    model = masked(MLP, 0.05)
    path = export_pruned(model, tmp_path / "m.scl.safetensors", format="compressed")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # flip bits in the tensor payload
    broken = tmp_path / "broken.scl.safetensors"
    broken.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        load_pruned(broken)
    truncated = tmp_path / "truncated.scl.safetensors"
    truncated.write_bytes(path.read_bytes()[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_pruned(truncated)


# ---------------------------------------------------------------------------------------------------- checkpoints


class LitMLP(L.LightningModule):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))
        self.example_input_array = torch.zeros(1, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class LitOther(LitMLP):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__(hidden)
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.extra = nn.Linear(hidden, 4)


@pytest.fixture(scope="module")
def scl_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LitMLP]:
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g))
    model = LitMLP()
    trainer = L.Trainer(
        max_steps=8,
        callbacks=[SparseConnectivityLearning(lam=1.0, mask_lr=0.2)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
    path = root / "scl.ckpt"
    trainer.save_checkpoint(path)
    return path, model.eval()


@pytest.mark.parametrize("fmt", ["safetensors", "compressed"])
def test_export_from_checkpoint(tmp_path: Path, scl_checkpoint: tuple[Path, LitMLP], fmt: str) -> None:
    ckpt, trained = scl_checkpoint
    assert 0.0 < sum(m.kept() for _, _, m in iter_masks(trained)) < 640  # SCL pruned something
    x = torch.randn(5, 16)
    for model_class in (LitMLP, LitMLP(), None):  # a class, an instance, or none (weights need no model)
        path = export_pruned(ckpt, tmp_path / f"out.{fmt}", format=fmt, model_class=model_class)
        fresh = LitMLP().eval()
        fresh.load_state_dict(load_pruned(path), strict=True)
        with torch.no_grad():
            assert torch.equal(fresh(x), trained(x))


def test_load_masked_checkpoint_rebuilds_masks(scl_checkpoint: tuple[Path, LitMLP]) -> None:
    ckpt, trained = scl_checkpoint
    rebuilt = load_masked_checkpoint(ckpt, LitMLP).eval()
    assert [n for n, _, _ in iter_masks(rebuilt)] == ["model.1", "model.3"]
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained(x))


def test_checkpoint_of_another_architecture_names_the_keys(tmp_path: Path, scl_checkpoint) -> None:
    ckpt, _ = scl_checkpoint
    with pytest.raises(
        ValueError, match=r"missing from the checkpoint: 'extra.weight', 'extra.bias'; shape mismatch: 'model.3.bias'"
    ):
        export_pruned(ckpt, tmp_path / "x.safetensors", model_class=LitOther)
    with pytest.raises(ValueError, match=r"shape mismatch: 'model.1.bias': checkpoint \(32,\) vs model \(8,\)"):
        export_pruned(ckpt, tmp_path / "x.safetensors", model_class=LitMLP(hidden=8))
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_export(tmp_path: Path, scl_checkpoint, capsys: pytest.CaptureFixture) -> None:
    ckpt, trained = scl_checkpoint
    out = tmp_path / "cli.scl.safetensors"
    assert main([str(ckpt), "--format", "compressed", "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    fresh = LitMLP().eval()
    fresh.load_state_dict(load_pruned(out))
    x = torch.randn(2, 16)
    assert torch.equal(fresh(x), trained(x))
    args = [str(ckpt), "--format", "shrunk", "--model-class", f"{__name__}.LitMLP", "-o", str(tmp_path / "s.pt")]
    assert main(args) == 0
    small = load_shrunk(tmp_path / "s.pt", LitMLP)  # rebuilt with the checkpoint's hyper_parameters
    assert small.model[1].out_features < 32
    torch.testing.assert_close(small(x), trained(x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- bad input


def no_leftovers(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def test_model_without_masks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no connectivity masks"):
        export_pruned(MLP(), tmp_path / "x.safetensors")
    torch.save({"state_dict": MLP().state_dict()}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="no connectivity masks"):
        export_pruned(tmp_path / "plain.ckpt", tmp_path / "x.safetensors")
    assert no_leftovers(tmp_path) == ["plain.ckpt"]


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Unknown export format 'zip'; choose one of \['safetensors'"):
        export_pruned(masked(MLP, 0.5), tmp_path / "x.zip", format="zip")
    assert set(FORMATS) == {"safetensors", "state_dict", "compressed", "shrunk", "onnx", "onnx_shrunk"}
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_pruned(masked(MLP, 0.5), tmp_path / "x.safetensors", dtype="int8")


def test_unwritable_paths(tmp_path: Path) -> None:
    model = masked(MLP, 0.5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_pruned(model, tmp_path / "missing" / "x.safetensors")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        export_pruned(model, tmp_path)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(PermissionError, match="not writable"):
                export_pruned(model, locked / "x.safetensors")
        finally:
            locked.chmod(0o700)
    assert no_leftovers(tmp_path) == (["locked"] if os.geteuid() != 0 else [])


def test_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = masked(MLP, 0.5)
    target = tmp_path / "m.safetensors"
    target.write_bytes(b"previous export")

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_pruned(model, target)
    assert target.read_bytes() == b"previous export"  # the old file is untouched
    assert no_leftovers(tmp_path) == ["m.safetensors"]  # and no temporary file remains


def test_missing_example_input_for_shrunk(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs example_input"):
        export_pruned(masked(MLP, 0.5), tmp_path / "x.pt", format="shrunk")
    assert no_leftovers(tmp_path) == []
