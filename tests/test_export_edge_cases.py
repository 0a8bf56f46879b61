"""Exports and accounting on the models that trip pruning tools: swapped activations saved in checkpoints, tied
weights, other parametrizations, multi-input models, attention and recurrent layers, values float16 cannot hold,
and an export path that would overwrite the checkpoint it reads."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from lightning_scl import ELUSwap, SparseConnectivityLearning
from lightning_scl.accounting import SparsityAccountant, sparsity_report
from lightning_scl.export import (
    export_pruned,
    load_masked_checkpoint,
    load_pruned,
    load_shrunk,
    main,
    replay_shrink,
    shrink_model,
)
from lightning_scl.masking import fold_state_dict, has_parametrizations, inject_masks
from tests.conftest import MLP, loader, quiet_trainer


def _trained_elu_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    scl = SparseConnectivityLearning(lam=0.5, granularity="channel", report=False)
    trainer = quiet_trainer(max_steps=6, callbacks=[scl, ELUSwap()])
    trainer.fit(model, loader())
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    return model.eval(), path


def test_a_checkpoint_trained_with_elu_exports_the_elu_model(tmp_path):
    model, path = _trained_elu_checkpoint(tmp_path)
    x = torch.randn(8, 16)
    with torch.no_grad():
        reference = model(x)
        rebuilt = load_masked_checkpoint(path, MLP).eval()
        assert isinstance(rebuilt.net[1], nn.ELU)
        assert torch.allclose(rebuilt(x), reference, atol=1e-6)
        shrunk_path = export_pruned(path, tmp_path / "run.shrunk.pt", format="shrunk", model_class=MLP)
        small = load_shrunk(shrunk_path, MLP)
        assert isinstance(small.net[1], nn.ELU)
        assert torch.allclose(small(x), reference, atol=1e-5)


def test_the_shrunk_export_of_an_elu_model_in_memory_reloads_as_elu(tmp_path):
    model, _ = _trained_elu_checkpoint(tmp_path)
    x = torch.randn(8, 16)
    path = export_pruned(model, tmp_path / "m.shrunk.pt", format="shrunk")
    with torch.no_grad():
        assert torch.allclose(load_shrunk(path, MLP)(x), model(x), atol=1e-5)


def test_exporting_onto_the_checkpoint_itself_is_refused_and_the_cli_picks_another_name(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    trainer = quiet_trainer(max_steps=2, callbacks=[SparseConnectivityLearning(lam=0.1, report=False)])
    trainer.fit(model, loader())
    checkpoint = tmp_path / "last.pt"
    trainer.save_checkpoint(checkpoint)
    with pytest.raises(ValueError, match="it is the checkpoint being exported"):
        export_pruned(checkpoint, checkpoint, format="state_dict")
    assert main([str(checkpoint), "--format", "state_dict"]) == 0
    assert "optimizer_states" in torch.load(checkpoint, weights_only=True)  # still the training checkpoint
    assert sorted(torch.load(tmp_path / "last.pruned.pt", weights_only=True)) == sorted(MLP().state_dict())


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.relu(self.mid(self.emb(x))))


def test_masking_one_side_of_a_tied_weight_is_an_error_naming_both():
    net = TiedLM()
    with pytest.raises(ValueError, match=r"'head' shares \(ties\) its weight with 'emb.weight'.*exclude=\['head'\]"):
        inject_masks(net)
    assert not any("parametrizations" in key for key in net.state_dict())  # nothing registered half way
    masks = inject_masks(net, layers=[("mid", net.mid)])  # the fix the message gives
    assert sorted(masks) == ["mid"]


class TiedPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize(("granularity", "effective"), [("weight", 16 + 16), ("channel", 16 + 4)])
def test_tied_masked_layers_count_their_weight_once_and_their_flops_each(granularity, effective, tmp_path):
    net = TiedPair()
    masks = inject_masks(net, granularity=granularity)
    with torch.no_grad():
        if granularity == "weight":
            masks["a"].mask[:, :6] = -1.0  # 16 of 64 connections kept
        else:
            masks["a"].mask[:6] = -1.0  # 2 of 8 outputs kept: b sees 2 live inputs, keeps 2 outputs
    report = SparsityAccountant(net, torch.randn(2, 8)).report()
    assert report.totals.params_total == 64 + 8 + 8
    assert report.totals.connections_total == 64 and report.totals.connections_kept == 16
    assert {r.name: r.effective_flops for r in report.rows} == {"a": 16, "b": effective - 16}
    assert all(r.kept >= 0 for r in report.rows)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "tied.ckpt")
    from_tensors = sparsity_report(tmp_path / "tied.ckpt").totals
    assert (from_tensors.params_total, from_tensors.connections_total) == (80, 64)
    assert from_tensors.connections_kept == 16


def test_another_parametrization_passes_through_the_export():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), spectral_norm(nn.Linear(4, 2)))
    inject_masks(net, layers=[("0", net[0])])
    folded = fold_state_dict(net.state_dict())
    assert "2.parametrizations.weight.original" in folded and "0.weight" in folded
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), spectral_norm(nn.Linear(4, 2)))
    plain.load_state_dict(folded, strict=True)


class FiLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x, scale):
        return self.fc2(torch.relu(self.fc1(x) * scale))


def test_shrinking_a_two_input_model_from_a_zero_example_stays_exact():
    torch.manual_seed(0)
    net = FiLM()
    masks = inject_masks(net, granularity="channel")
    with torch.no_grad():
        masks["fc1"].mask[:6] = -1.0  # dead units: their output is relu(bias * scale), not a constant
    small, _ = shrink_model(net, (torch.zeros(4, 8), torch.zeros(4, 1)))
    x, scale = torch.randn(5, 8), torch.rand(5, 1) + 0.5
    with torch.no_grad():
        assert torch.allclose(small(x, scale), net.eval()(x, scale), atol=1e-6)
        assert torch.allclose(small(x, -scale), net(x, -scale), atol=1e-6)


def test_attention_flops_include_its_projections_and_say_what_is_not_followed():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    inject_masks(layer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = sparsity_report(layer, example_input=torch.randn(1, 10, 16))
    # in_proj 10*16*48, out_proj 10*16*16, q@k and weights@v 2*10*10*16, feed-forward 2*10*16*32, two norms 10*16*5 each
    assert report.totals.dense_flops == 7680 + 2560 + 3200 + 10240 + 1600
    assert any("self_attn.out_proj" in str(w.message) for w in caught)
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_recurrent_layers_fvcore_cannot_count_are_named_in_a_warning():
    with pytest.warns(UserWarning, match=r"aten::lstm \(x1\)"):
        sparsity_report(nn.LSTM(4, 8), example_input=torch.randn(3, 1, 4))


@pytest.mark.parametrize("fmt", ["safetensors", "compressed"])
def test_a_float16_export_refuses_values_float16_cannot_hold(fmt, tmp_path):
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    inject_masks(net, layers=[("0", net[0])])
    net[1].running_var.fill_(1.0e5)
    with pytest.raises(ValueError, match=r"'1.running_var' holds 4 value\(s\) up to 100000.*dtype='float32'"):
        export_pruned(net, tmp_path / f"a.{fmt}", format=fmt, dtype="float16")
    assert not list(tmp_path.iterdir())  # nothing half written
    path = export_pruned(net, tmp_path / "a.safetensors", format="safetensors", dtype="bfloat16")
    assert torch.isfinite(load_pruned(path)["1.running_var"]).all()


class FrozenNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.fc(x))))


@pytest.mark.parametrize("how", ["shrink_model", "export_shrunk", "sparsity_report"])
def test_export_and_accounting_leave_every_module_in_its_own_mode(how, tmp_path):
    torch.manual_seed(0)
    net = FrozenNormNet()
    inject_masks(net)
    net.train()
    net.norm.eval()  # a frozen batch norm inside a model in training
    stats = net.norm.running_mean.clone()
    example = torch.randn(4, 4)
    if how == "shrink_model":
        shrink_model(net, example)
    elif how == "export_shrunk":
        export_pruned(net, tmp_path / "net.shrunk.pt", format="shrunk", example_input=example)
    else:
        sparsity_report(net, example)
    assert net.training and net.fc.training and not net.norm.training
    net(example)  # the frozen norm still does not update its statistics
    assert torch.equal(net.norm.running_mean, stats)


def test_checkpoints_of_a_users_own_lightning_cli_rebuild_through_the_python_api(tmp_path):
    torch.manual_seed(0)
    model = MLP(hidden=24)
    trainer = quiet_trainer(max_steps=2, callbacks=[SparseConnectivityLearning(lam=0.1, report=False)])
    trainer.fit(model, loader())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    # what LightningCLI(load_from_checkpoint_support=True), its default, stores next to the constructor arguments
    checkpoint["hyper_parameters"]["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    checkpoint["hyper_parameters"]["_class_path"] = "tests.conftest.MLP"
    torch.save(checkpoint, path)
    plain = export_pruned(path, tmp_path / "model.safetensors", model_class=MLP)
    assert load_pruned(plain)["net.0.weight"].shape == (24, 16)
    assert sparsity_report(path, model_class=MLP).totals.params_total == sum(
        p.numel() for p in MLP(hidden=24).parameters()
    )
    shrunk = export_pruned(path, tmp_path / "model.shrunk.pt", format="shrunk", model_class=MLP)
    assert "_instantiator" not in torch.load(shrunk, weights_only=True)["hyper_parameters"]
    model.eval()
    x = torch.randn(5, 16)
    torch.testing.assert_close(load_shrunk(shrunk, MLP)(x), model(x), rtol=1e-4, atol=1e-5)


def test_load_shrunk_with_a_class_that_does_not_take_the_stored_arguments_says_so(tmp_path):
    torch.manual_seed(0)
    model = MLP(hidden=24)
    inject_masks(model)
    shrunk = export_pruned(model, tmp_path / "model.shrunk.pt", format="shrunk")

    class Other(nn.Module):
        def __init__(self):
            super().__init__()

    with pytest.raises(ValueError, match=r"Could not instantiate Other with the checkpoint's hyper_parameters"):
        load_shrunk(shrunk, Other)


class LogInput(nn.Module):
    """Takes a non-negative input (a power spectrum) through log: negative probe values would give NaN."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, power):
        return self.fc2(torch.relu(self.fc1(torch.log(power + 1e-6))))


def test_shrinking_a_model_that_needs_non_negative_inputs_stays_exact():
    torch.manual_seed(0)
    net = LogInput()
    masks = inject_masks(net, granularity="channel")
    with torch.no_grad():
        masks["fc1"].mask[:4] = -1.0
    example = torch.rand(4, 16)
    small, _ = shrink_model(net, example)
    assert small.fc1.out_features == 4
    x = torch.rand(32, 16) * 5
    torch.testing.assert_close(small(x), net.eval()(x), rtol=1e-4, atol=1e-5)


def test_an_example_input_the_model_cannot_run_is_a_clear_error(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 30), nn.ReLU(), nn.Linear(30, 10))
    inject_masks(net)
    wrong = torch.zeros(1, 3, 32, 32)
    message = r"cannot run on the example input of shape \(1, 3, 32, 32\) \(torch.float32 on cpu\): RuntimeError: mat1"
    with pytest.raises(ValueError, match="shrink_model: Sequential " + message):
        shrink_model(net, wrong)
    with pytest.raises(ValueError, match="format='shrunk': .*" + message):
        export_pruned(net, tmp_path / "net.shrunk.pt", format="shrunk", example_input=wrong)
    assert not (tmp_path / "net.shrunk.pt").exists()


@pytest.mark.parametrize("fmt", ["safetensors", "compressed", "state_dict", "shrunk"])
def test_exported_files_get_the_umask_mode_not_a_private_one(fmt, tmp_path):
    import os

    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    inject_masks(net)
    old = os.umask(0o022)
    try:
        written = export_pruned(net, tmp_path / f"net.{fmt}", format=fmt, example_input=torch.randn(2, 4))
        assert written.stat().st_mode & 0o777 == 0o644  # readable by the service that serves it
        written.chmod(0o640)
        export_pruned(net, written, format=fmt, example_input=torch.randn(2, 4))
        assert written.stat().st_mode & 0o777 == 0o640  # replacing a file keeps its mode
    finally:
        os.umask(old)


def _spectral_discriminator() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), spectral_norm(nn.Linear(16, 16)), nn.ReLU(), nn.Linear(16, 1))


@pytest.mark.parametrize("fmt", ["shrunk", "onnx"])
def test_a_spectral_norm_layer_is_folded_into_shrunk_and_onnx_exports(fmt, tmp_path):
    torch.manual_seed(0)
    net = _spectral_discriminator()
    for _ in range(3):
        net(torch.randn(4, 8))  # power iterations in train mode: u and v are no longer their initial values
    masks = inject_masks(net, layers=[("0", net[0]), ("4", net[4])], granularity="channel")
    with torch.no_grad():
        masks["0"].mask[:6] = -1.0  # six hidden units switched off
    x = torch.randn(32, 8)
    expected = net.eval()(x)
    net.train()
    path = export_pruned(net, tmp_path / f"d.{fmt}", format=fmt, example_input=torch.randn(2, 8))
    if fmt == "shrunk":
        small = load_shrunk(path, _spectral_discriminator)
        assert small[0].out_features == 10
        torch.testing.assert_close(small(x), expected, rtol=1e-4, atol=1e-5)
    else:
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {session.get_inputs()[0].name: x[:2].numpy()})
        torch.testing.assert_close(torch.from_numpy(out), expected[:2], rtol=1e-4, atol=1e-5)
    assert sum(parametrize.is_parametrized(m) for m in net.modules()) == 3  # masks and spectral norm stay


class ImpossibleClass(nn.Module):
    """Log-probabilities with one class masked out (-inf by design) and a per-sample gain on the hidden units."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 3)
        self.register_buffer("invalid", torch.tensor([False, False, True]))

    def forward(self, x):
        h = torch.relu(self.fc1(x)) * x.sum(1, keepdim=True)
        return torch.log_softmax(self.fc2(h).masked_fill(self.invalid, float("-inf")), dim=1)


def test_an_output_that_is_minus_inf_by_design_keeps_the_random_probe_and_the_shrink_exact():
    torch.manual_seed(0)
    net = ImpossibleClass()
    masks = inject_masks(net, layers=[("fc1", net.fc1)], granularity="channel")
    with torch.no_grad():
        masks["fc1"].mask[:3] = -1.0  # dead units: a one-sample probe would take the live ones for constants too
    small, _ = shrink_model(net, torch.randn(1, 8))
    # two of the dead units have a positive bias and pass on the per-sample gain: not constants, so they stay
    # (a one-sample probe folded them into a bias and the shrunk model was off by 0.4)
    assert small.fc2.in_features == 7
    x = torch.randn(64, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), net.eval()(x))


def test_a_weight_norm_layer_is_folded_into_shrunk_exports():
    from torch.nn.utils.parametrizations import weight_norm

    def make():
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), weight_norm(nn.Linear(16, 16)), nn.ReLU(), nn.Linear(16, 1))

    torch.manual_seed(0)
    net = make()
    masks = inject_masks(net, layers=[("0", net[0])], granularity="channel")
    with torch.no_grad():
        masks["0"].mask[:6] = -1.0
    small, record = shrink_model(net, torch.randn(2, 8))
    assert small[0].out_features == 10 and not has_parametrizations(small)
    x = torch.randn(16, 8)
    torch.testing.assert_close(small(x), net.eval()(x), rtol=1e-4, atol=1e-5)
    fresh = replay_shrink(make(), record)  # the fresh model's weight_norm is folded the same way
    fresh.load_state_dict(small.state_dict())


def test_a_weights_only_checkpoint_keeps_the_records_of_the_swap_and_the_masks(tmp_path):
    # Lightning skips Callback.on_save_checkpoint for weights-only checkpoints: without the records the loaders
    # rebuilt ReLU for a network trained with ELU, silently.
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    model = MLP()
    saver = ModelCheckpoint(dirpath=tmp_path, save_weights_only=True, save_last=True)
    scl = SparseConnectivityLearning(lam=0.5, granularity="channel", report=False)
    trainer = quiet_trainer(max_steps=6, callbacks=[scl, ELUSwap(), saver], enable_checkpointing=True)
    trainer.fit(model, loader())
    checkpoint = torch.load(saver.last_model_path, weights_only=True)
    assert "optimizer_states" not in checkpoint  # weights only
    assert set(checkpoint["lightning_scl"]) == {"scl", "elu_swap"}
    assert checkpoint["lightning_scl"]["scl"]["granularity"] == "channel"
    x = torch.randn(8, 16)
    with torch.no_grad():
        rebuilt = load_masked_checkpoint(saver.last_model_path, MLP).eval()
        assert isinstance(rebuilt.net[1], nn.ELU)
        torch.testing.assert_close(rebuilt(x), model.eval()(x))
    # after fit too (the stand-in stays with the model), and a copy of the model writes its own records
    import copy

    trainer.save_checkpoint(tmp_path / "after.ckpt", weights_only=True)
    assert set(torch.load(tmp_path / "after.ckpt", weights_only=True)["lightning_scl"]) == {"scl", "elu_swap"}
    twin = copy.deepcopy(model)
    twin.net[0].parametrizations.weight[0].mask.data.fill_(-1.0)  # the copy prunes its first layer entirely
    records = {}
    twin.on_save_checkpoint(records)
    assert records["lightning_scl"]["scl"]["density"] < checkpoint["lightning_scl"]["scl"]["density"]


def test_a_lightning_checkpoint_without_records_is_loaded_with_a_warning(tmp_path):
    _, path = _trained_elu_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["lightning_scl"]
    with pytest.warns(UserWarning, match="has no lightning_scl record"):
        rebuilt = load_masked_checkpoint(checkpoint, MLP)
    assert isinstance(rebuilt.net[1], nn.ReLU)  # what the warning is about
