"""Physical shrink: dead/unused channels removed through Torch-Pruning, constants folded, structure replayable."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_scl.callbacks.scl import SparseConnectivityLearning
from lightning_scl.export import export_pruned, load_shrunk, plain_copy, replay_shrink, shrink_model
from lightning_scl.masking import inject_masks, iter_masks

from .test_export import LeNet5, masked, randomize_bn, resnet18

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: one thread is faster


def gate(model: nn.Module, name: str) -> torch.Tensor:
    return dict((n, m) for n, _, m in iter_masks(model))[name].mask


def assert_same_function(small: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    small.eval()
    reference.eval()
    with torch.no_grad():
        expected, got = reference(x), small(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def flops(model: nn.Module, x: torch.Tensor) -> int:
    from fvcore.nn import FlopCountAnalysis

    logging.disable(logging.WARNING)  # fvcore warns about ops it skips (relu, add...)
    try:
        return int(FlopCountAnalysis(model.eval(), x).unsupported_ops_warnings(False).total())
    finally:
        logging.disable(logging.NOTSET)


# ---------------------------------------------------------------------------------------------------- MLP


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 5)
        self.fc3 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def test_dead_unit_bias_is_folded_into_the_next_layer() -> None:
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        model.fc1.bias.copy_(torch.linspace(0.2, 1.0, 8))  # dead units still output relu(b) > 0
    inject_masks(model)
    with torch.no_grad():
        gate(model, "fc1")[[1, 4]] = -1.0  # units 1 and 4 of fc1: every incoming connection off
        gate(model, "fc3")[:, [0, 2]] = -1.0  # units 0 and 2 of fc2: every outgoing connection off
    x = torch.randn(7, 6)
    small, record = shrink_model(model, x[:1])
    assert (small.fc1.out_features, small.fc2.in_features) == (6, 6)
    assert (small.fc2.out_features, small.fc3.in_features) == (3, 3)
    assert small.fc3.out_features == 3  # the model's output is never touched
    assert small.fc1.in_features == 6  # nor its input
    assert record["params_after"] < record["params_before"]
    assert record["kept_indices"]["fc1"] == {"out": [0, 2, 3, 5, 6, 7]}
    assert record["kept_indices"]["fc2"] == {"in": [0, 2, 3, 5, 6, 7], "out": [1, 3, 4]}
    assert_same_function(small, model, x)

    # Dropping the dead units without folding their constant output would be wrong:
    naive = plain_copy(model).eval()
    keep = [0, 2, 3, 5, 6, 7]
    naive.fc1 = nn.Linear(6, 6).requires_grad_(False)
    naive.fc1.weight.copy_(model.fc1.weight[keep])
    naive.fc1.bias.copy_(model.fc1.bias[keep])
    naive.fc2.weight = nn.Parameter(naive.fc2.weight[:, keep])
    with torch.no_grad():
        assert not torch.allclose(naive(x), model(x), atol=1e-3)


def test_shrink_leaves_a_model_without_removable_channels_alone() -> None:
    model = MLP()
    inject_masks(model)
    x = torch.randn(2, 6)
    small, record = shrink_model(model, x)
    assert record["pruning_history"] == []
    assert record["params_after"] == record["params_before"]
    assert_same_function(small, model, x)
    assert type(model.fc1).__name__ == "ParametrizedLinear"  # the source model keeps its masks


# ---------------------------------------------------------------------------------------------------- LeNet-5


def test_lenet5_channel_masks_shrink_and_reload(tmp_path: Path) -> None:
    model = masked(LeNet5, 0.5, granularity="channel", seed=3)
    with torch.no_grad():
        gate(model, "classifier.3")[:] = 1.0  # keep all 10 outputs
        for layer in ("features.0", "features.3", "classifier.1"):  # non-zero constants to fold
            getattr(model, layer.split(".")[0])[int(layer.split(".")[1])].bias.uniform_(0.1, 0.5)
    x = torch.randn(4, 1, 28, 28)
    small, record = shrink_model(model, x[:1])
    kept = {n: int((m.mask > 0).sum()) for n, _, m in iter_masks(model)}
    # conv2 has no padding and fc1 is linear: every dead channel goes, its constant folded into the next bias
    assert small.features[0].out_channels == kept["features.0"]
    assert small.features[3].out_channels == kept["features.3"]
    assert small.classifier[1].in_features == 16 * kept["features.3"]
    assert small.classifier[1].out_features == kept["classifier.1"]
    assert record["kept_for_exactness"] == 0
    assert_same_function(small, model, x)
    assert flops(small, x[:1]) < 0.6 * flops(LeNet5(), x[:1])

    path = export_pruned(model, tmp_path / "lenet5.shrunk.pt", format="shrunk", example_input=x[:1])
    payload = torch.load(path, weights_only=True)  # no pickled code
    assert payload["record"]["pruning_history"] == record["pruning_history"]
    rebuilt = load_shrunk(path, LeNet5)
    assert sum(p.numel() for p in rebuilt.parameters()) == record["params_after"]
    assert_same_function(rebuilt, model, x)


def test_load_shrunk_into_another_architecture_fails_clearly(tmp_path: Path) -> None:
    model = masked(LeNet5, 0.5, granularity="channel", seed=3)
    path = export_pruned(model, tmp_path / "l.shrunk.pt", format="shrunk", example_input=torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="Cannot replay the shrink record on Sequential"):
        load_shrunk(path, lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 10)))


# ---------------------------------------------------------------------------------------------------- padding


class PaddedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.act(self.bn1(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("trained_bn", [False, True])
def test_zero_padded_consumer_keeps_one_carrier_channel(trained_bn: bool) -> None:
    torch.manual_seed(0)
    model = PaddedNet()
    if trained_bn:
        randomize_bn(model)
        with torch.no_grad():
            model.bn1.bias.fill_(0.7)  # every dead channel outputs relu(BN(0)) > 0
    inject_masks(model, granularity="channel")
    with torch.no_grad():
        gate(model, "conv1")[[0, 2, 3, 6]] = -1.0
    x = torch.randn(3, 3, 9, 9)
    small, record = shrink_model(model, x[:1])
    # zero padding makes a constant channel position dependent at the border: with non-zero constants one dead
    # channel stays as a carrier that absorbs the others; with zero constants (fresh BN) nothing needs carrying
    assert small.conv1.out_channels == (5 if trained_bn else 4)
    assert record["kept_for_exactness"] == (1 if trained_bn else 0)
    assert_same_function(small, model, x)


# ---------------------------------------------------------------------------------------------------- ResNet-18


def test_resnet18_residual_and_batchnorm(tmp_path: Path) -> None:
    model = masked(resnet18, 0.5, granularity="channel", seed=1)
    with torch.no_grad():
        gate(model, "fc")[:] = 1.0
        # residual stream of stage 1: channel 5 dead in all three producers, channel 9 dead in two of three only
        for name in ("conv1", "layer1.0.conv2", "layer1.1.conv2"):
            gate(model, name)[[5, 9]] = -1.0
            gate(model, name)[[c for c in range(64) if c not in (5, 9)]] = 1.0
        gate(model, "layer1.1.conv2")[9] = 1.0
    x = torch.randn(2, 3, 32, 32)
    small, record = shrink_model(model, x[:1])
    assert small.conv1.out_channels == 63  # 5 removed from stem, bn1, both blocks and every consumer; 9 kept
    assert 5 not in record["kept_indices"]["bn1"]["out"] and 9 in record["kept_indices"]["bn1"]["out"]
    assert small.layer1[0].conv1.in_channels == small.layer1[1].conv2.out_channels == small.layer2[0].conv1.in_channels
    assert small.layer1[0].bn2.num_features == 63
    assert record["params_after"] < 0.6 * record["params_before"]
    assert any(name.endswith("downsample.0") for name in record["added_bias"])  # 1x1 unpadded: bias absorbs
    assert_same_function(small, model, x)

    fresh = replay_shrink(torchvision.models.resnet18(num_classes=10), record)
    fresh.load_state_dict(small.state_dict(), strict=True)
    assert_same_function(fresh, model, x)


# ---------------------------------------------------------------------------------------------------- channel SCL


class SmallConvNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 4),
        )
        self.example_input_array = torch.zeros(1, 1, 16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_channel_granularity_training_shrinks_flops(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 1, 16, 16, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, :, :8].mean((1, 2, 3)) > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    module = SmallConvNet()
    scl = SparseConnectivityLearning(granularity="channel", lam=0.5, mask_lr=0.1, exclude=["model.9"])
    trainer = L.Trainer(
        max_steps=16,
        callbacks=[scl],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    kept = {name: int((mask.mask > 0).sum()) for name, _, mask in iter_masks(module)}
    assert 0 < kept["model.0"] < 16 and 0 < kept["model.4"] < 32, kept  # some channels switched off, not all

    path = export_pruned(module, tmp_path / "small.shrunk.pt", format="shrunk")
    small = load_shrunk(path, SmallConvNet)
    # two zero-padded convs: at most one carrier channel kept in front of the second one
    assert kept["model.0"] <= small.model[0].out_channels <= kept["model.0"] + 1
    assert small.model[4].out_channels == kept["model.4"]
    probe = torch.randn(4, 1, 16, 16)
    assert_same_function(small, module, probe)
    dense_flops, shrunk_flops = flops(SmallConvNet(), probe[:1]), flops(small, probe[:1])
    assert shrunk_flops < 0.8 * dense_flops, (shrunk_flops, dense_flops)


class _TiedPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.a, self.b, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(torch.relu(self.inp(x)))))))


def test_tied_weights_stay_tied_and_the_shrunk_model_never_grows():
    # Torch-Pruning rewrote the tied weight for one of its layers: untied, 92 -> 105 parameters
    torch.manual_seed(0)
    net = _TiedPair()
    masks = inject_masks(net)
    with torch.no_grad():
        masks["a"].mask[:, 0] = -1.0  # one input column of the shared weight off
    x = torch.randn(5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, record = shrink_model(net, x[:1])
    assert small.a.weight is small.b.weight
    assert record["params_after"] <= record["params_before"]
    with torch.no_grad():
        torch.testing.assert_close(small(x), net.eval()(x))


class _ChannelShuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        b, c, height, width = h.shape
        return self.c2(h.view(b, 2, c // 2, height, width).transpose(1, 2).reshape(b, c, height, width))


def test_an_operation_torch_pruning_mismodels_gives_the_clear_error():
    torch.manual_seed(0)
    net = _ChannelShuffle()
    masks = inject_masks(net)
    with torch.no_grad():
        masks["c1"].mask[[1, 4]] = -1.0  # two filters off: the shuffle's reshape no longer fits
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="format='safetensors'"):
        warnings.simplefilter("ignore")
        shrink_model(net, torch.randn(1, 3, 4, 4))
