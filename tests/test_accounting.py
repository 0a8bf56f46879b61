"""Parameters, kept connections, density and FLOPs accounting (lightning_scl.accounting)."""

from __future__ import annotations

import csv
import json

import fvcore.nn
import pytest
import torch
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis
from torch import nn

from lightning_scl.accounting import (
    SparsityAccountant,
    dense_macs_by_layer,
    plot_history,
    plot_layer_density,
    sparsity_report,
)
from lightning_scl.masking import inject_masks, iter_masks, strip_masks


class LeNet5(nn.Module):
    """LeNet-5-Caffe: conv 20@5x5, pool, conv 50@5x5, pool, fc 800-500, fc 500-10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


# Per-sample MACs, by hand: output positions x output channels x (input channels x kernel taps).
LENET_DENSE = {"conv1": 24 * 24 * 20 * 25, "conv2": 8 * 8 * 50 * 20 * 25, "fc1": 800 * 500, "fc2": 500 * 10}


class ResidualNet(nn.Module):
    """A stem, one residual block with batch norm, global pooling and a classifier; 8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(self.bn_a(self.conv_a(s)))
        h = self.bn_b(self.conv_b(h))
        return self.fc(torch.flatten(self.pool(torch.relu(h + s)), 1))


def switch_off(mask_module, index) -> None:
    with torch.no_grad():
        mask_module.mask[index] = -1.0


# ---------------------------------------------------------------------------------------------------- counts


def test_density_and_kept_counts_by_hand():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.BatchNorm1d(2))
    masks = inject_masks(net, layers=[("0", net[0]), ("2", net[2])])
    switch_off(masks["0"], (0, slice(None)))  # 4 connections of unit 0
    switch_off(masks["0"], (1, 0))  # 1 more
    switch_off(masks["2"], (1, 2))
    report = SparsityAccountant(net).report()
    rows = {r.name: r for r in report.rows}
    assert list(rows) == ["0", "2", "3"]
    assert (rows["0"].params, rows["0"].kept, rows["0"].density) == (15, 10, 7 / 12)
    assert (rows["2"].params, rows["2"].kept, rows["2"].density) == (8, 7, 5 / 6)
    assert (rows["3"].params, rows["3"].kept, rows["3"].masked, rows["3"].density) == (4, 4, False, 1.0)
    t = report.totals
    assert (t.params_total, t.connections_total, t.connections_kept) == (27, 18, 12)
    assert t.params_kept == 27 - 6  # mask variables are not parameters; switched-off connections are not kept
    assert t.density == pytest.approx(12 / 18)
    assert t.dense_flops is t.effective_flops is t.flops_ratio is None


def test_channel_masks_count_whole_rows():
    conv = nn.Conv2d(3, 4, 3)
    masks = inject_masks(conv, layers=[("", conv)], granularity="channel")
    switch_off(masks[""], (slice(0, 3),))  # 3 of 4 filters off, 27 connections each
    stats = SparsityAccountant(conv).snapshot()
    assert (stats.connections_total, stats.connections_kept, stats.density) == (108, 27, 0.25)
    assert stats.params_kept == 108 + 4 - 81


def test_plain_model_counts_every_parameter_once():
    shared = nn.Linear(3, 3)
    net = nn.Sequential(shared, nn.ReLU(), shared)  # tied layer: one set of parameters
    net.scale = nn.Parameter(torch.ones(2))  # a parameter outside every layer
    stats = SparsityAccountant(net, torch.randn(2, 3)).snapshot()
    assert stats.params_total == stats.params_kept == 12 + 2
    assert (stats.connections_total, stats.density) == (0, 1.0)
    assert stats.dense_flops == stats.effective_flops == 18
    assert stats.flops_ratio == 1.0


# ---------------------------------------------------------------------------------------------------- dense FLOPs


def test_dense_macs_of_lenet5_by_hand_and_equal_to_fvcore_total():
    net = LeNet5()
    x = torch.randn(16, 1, 28, 28)
    macs = dense_macs_by_layer(net, x)
    assert macs == LENET_DENSE
    assert sum(macs.values()) == FlopCountAnalysis(net, x[:1]).total()
    inject_masks(net)
    assert dense_macs_by_layer(net, x) == LENET_DENSE  # masks do not change what is counted
    assert SparsityAccountant(net, x).snapshot().dense_flops == 2_293_000


def test_dense_total_includes_ops_outside_weighted_layers():
    net = ResidualNet()
    x = torch.randn(2, 3, 8, 8)
    report = sparsity_report(net, x)
    assert report.totals.dense_flops == FlopCountAnalysis(net.eval(), x[:1]).total()
    assert report.other_flops == 8 * 8 * 8  # the adaptive pooling module has no weight: counted in the total only
    assert sum(r.dense_flops for r in report.rows) + report.other_flops == report.totals.dense_flops


def test_counting_leaves_the_model_as_it_was():
    net = ResidualNet().train()
    net.bn_a.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    SparsityAccountant(net, torch.randn(4, 3, 8, 8)).snapshot()
    assert net.training and not net.bn_a.training and net.bn_b.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # no BN statistics update


def test_dict_and_tuple_example_inputs():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 2)
            self.b = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(y)

    net = TwoInputs()
    as_tuple = dense_macs_by_layer(net, (torch.randn(5, 4), torch.randn(5, 3)))
    as_dict = dense_macs_by_layer(net, {"y": torch.randn(5, 3), "x": torch.randn(5, 4)})
    assert as_tuple == as_dict == {"a": 8, "b": 6}


def test_nested_weighted_layer_counts_only_its_own_work():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))
            self.inner = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x @ self.weight)

    net = nn.Sequential(Block())
    assert dense_macs_by_layer(net, torch.randn(1, 4)) == {"0": 16, "0.inner": 16}


def test_dense_flops_are_cached_not_recomputed(monkeypatch):
    calls = []

    class Counting(FlopCountAnalysis):
        def __init__(self, *args, **kwargs) -> None:
            calls.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(fvcore.nn, "FlopCountAnalysis", Counting)
    net = LeNet5()
    masks = inject_masks(net)
    acc = SparsityAccountant(net, torch.randn(2, 1, 28, 28))
    ratios = []
    for step in range(5):
        switch_off(masks["fc1"], (step,))
        ratios.append(acc.snapshot().flops_ratio)
        acc.dense_macs_by_layer()
    assert len(calls) == 1
    assert ratios == sorted(ratios, reverse=True) and ratios[0] > ratios[-1]


# ---------------------------------------------------------------------------------------------------- effective FLOPs


def test_effective_flops_lenet5_weight_masks_by_hand():
    net = LeNet5()
    masks = inject_masks(net)
    switch_off(masks["conv1"], (slice(0, 10),))  # half the filters' connections: 250 of 500
    switch_off(masks["conv2"], (slice(0, 40),))  # 5000 of 25000 kept
    switch_off(masks["fc1"], (slice(None), slice(80, None)))  # 40000 of 400000 kept
    report = sparsity_report(net, torch.randn(1, 1, 28, 28))
    expected = {
        "conv1": LENET_DENSE["conv1"] // 2,
        "conv2": LENET_DENSE["conv2"] // 5,
        "fc1": LENET_DENSE["fc1"] // 10,
        "fc2": LENET_DENSE["fc2"],
    }
    assert {r.name: r.effective_flops for r in report.rows} == expected
    assert report.totals.effective_flops == 144_000 + 320_000 + 40_000 + 5_000
    assert report.totals.flops_ratio == pytest.approx(509_000 / 2_293_000)


def test_effective_flops_lenet5_channel_masks_by_hand():
    net = LeNet5()
    masks = inject_masks(net, granularity="channel")
    switch_off(masks["conv1"], (slice(0, 3),))  # 17 of 20 channels
    switch_off(masks["conv2"], (slice(0, 10),))  # 40 of 50 channels
    switch_off(masks["fc1"], (slice(0, 100),))  # 400 of 500 units
    report = sparsity_report(net, torch.randn(1, 1, 28, 28))
    # A removed channel also removes the next layer's input work; after flatten, each conv2 channel is 4x4 inputs.
    expected = {
        "conv1": 24 * 24 * 17 * 1 * 25,
        "conv2": 8 * 8 * 40 * 17 * 25,
        "fc1": 400 * 40 * 16,
        "fc2": 10 * 400,
    }
    assert {r.name: r.effective_flops for r in report.rows} == expected
    assert report.totals.effective_flops == 1_592_800
    assert {r.name: r.density for r in report.rows} == {"conv1": 0.85, "conv2": 0.8, "fc1": 0.8, "fc2": 1.0}


def test_effective_flops_residual_net_channel_masks_by_hand():
    net = ResidualNet()
    masks = inject_masks(net, granularity="channel")
    switch_off(masks["stem"], ([0, 1],))
    switch_off(masks["conv_a"], ([2, 3, 4],))
    switch_off(masks["conv_b"], ([0, 5],))
    report = sparsity_report(net, torch.randn(1, 3, 8, 8))
    per_pair = 8 * 8 * 9  # one 3x3 output channel from one input channel, padded 8x8 output
    rows = {r.name: r for r in report.rows}
    assert rows["stem"].effective_flops == 6 * 3 * per_pair
    assert rows["conv_a"].effective_flops == 5 * 6 * per_pair  # its input: the 6 channels the stem keeps
    assert rows["conv_b"].effective_flops == 6 * 5 * per_pair
    # The classifier reads relu(conv_b + stem): a channel is dead only when both sides removed it (channel 0).
    assert rows["fc"].effective_flops == 4 * 7
    for bn in ("bn0", "bn_a", "bn_b"):  # unmasked layers count fully
        assert rows[bn].effective_flops == rows[bn].dense_flops
    total = sum(r.effective_flops for r in report.rows) + report.other_flops
    assert report.totals.effective_flops == total


def test_channel_snapshot_follows_mask_changes():
    net = LeNet5()
    masks = inject_masks(net, granularity="channel")
    acc = SparsityAccountant(net, torch.randn(1, 1, 28, 28))
    assert acc.snapshot().effective_flops == 2_293_000
    assert acc.snapshot().effective_flops == 2_293_000  # unchanged gates: the cached evaluation
    switch_off(masks["conv2"], ([0],))  # one channel: its own work and 16 fc1 inputs
    assert acc.snapshot().effective_flops == 2_293_000 - 8 * 8 * 20 * 25 - 500 * 16
    with torch.no_grad():
        masks["conv2"].mask[0] = 0.5  # back on
    assert acc.snapshot().effective_flops == 2_293_000


def test_dead_inputs_propagate_through_depthwise_convolutions():
    net = nn.Sequential(
        nn.Conv2d(2, 4, 1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, groups=4),  # depthwise: channel c reads only channel c
        nn.ReLU(),
        nn.Conv2d(4, 3, 1),
    )
    masks = inject_masks(net, granularity="channel")
    switch_off(masks["0"], ([1],))
    rows = {r.name: r for r in sparsity_report(net, torch.randn(1, 2, 5, 5)).rows}
    # Channel 1 of the depthwise conv is switched on but reads a removed channel: it is not computed either.
    assert rows["2"].effective_flops == 3 * 9 * 9
    assert rows["4"].effective_flops == 3 * 3 * 9


class BranchyNet(nn.Module):
    """Depthwise-separable block with a residual add, a concatenated branch, pooling, flatten and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.pw = nn.Conv2d(6, 6, 1)
        self.side = nn.Conv2d(3, 4, 1)
        self.mix = nn.Conv2d(10, 5, 3, padding=1, groups=5)
        self.fc = nn.Linear(5 * 4 * 4, 3)
        self.act = nn.LeakyReLU(0.1)  # injective: a live channel always varies with the input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.act(self.bn(self.stem(x)))
        h = self.act(self.pw(self.act(self.dw(s)))) + s
        h = torch.cat([h, self.act(self.side(x))], dim=1)
        return self.fc(F.max_pool2d(self.act(self.mix(h)), 2).flatten(1))


def reference_effective_macs(net: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Black-box reference: an input channel of a layer is live iff it varies across samples."""
    dense = dense_macs_by_layer(net, x)
    inputs = {}
    layers = {n: m for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0])) for n, m in layers.items()]
    with torch.no_grad():
        net.double().eval()(x.double())
    for h in hooks:
        h.remove()
    gates = {name: mask.gate().reshape(-1) for name, _, mask in iter_masks(net)}
    out = {}
    for name, layer in layers.items():
        t = inputs[name]
        dim = t.dim() - 1 if isinstance(layer, nn.Linear) else 1
        t = t.movedim(dim, 0).reshape(t.shape[dim], t.shape[0], -1)
        live = (t.amax(1) - t.amin(1) > 0).any(1)
        groups = getattr(layer, "groups", 1)
        gate = gates.get(name, torch.ones(layer.weight.shape[0], dtype=torch.bool))
        unit = dense[name] / (gate.numel() * live.numel() / groups)
        pairs = (gate.view(groups, -1).sum(1) * live.view(groups, -1).sum(1)).sum()
        out[name] = float(unit * pairs)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_channel_links_match_a_black_box_reference(seed):
    torch.manual_seed(seed)
    net = BranchyNet()
    masks = inject_masks(net, granularity="channel")
    with torch.no_grad():
        for mask in masks.values():
            mask.mask.copy_(torch.where(torch.rand_like(mask.mask) < 0.4, -1.0, 1.0))
    x = torch.randn(8, 3, 8, 8)
    rows = {r.name: r.effective_flops for r in sparsity_report(net, x).rows if r.name in masks}
    assert rows == pytest.approx(reference_effective_macs(net, x))


def test_unfollowable_op_falls_back_to_density_scaling():
    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)
            self.mix = nn.Parameter(torch.randn(4, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.linalg.matmul(self.a(x), self.mix))  # mixes channels: links unknown

    net = Mixer()
    masks = inject_masks(net, granularity="channel")
    switch_off(masks["a"], ([0, 1],))
    switch_off(masks["b"], ([0],))
    rows = {r.name: r for r in sparsity_report(net, torch.randn(1, 4)).rows}
    assert rows["a"].effective_flops == 2 * 4
    assert rows["b"].effective_flops == 1 * 4  # all 4 inputs kept: its count is dense x its own density


def test_without_example_input_flops_are_unavailable():
    net = LeNet5()
    inject_masks(net)
    acc = SparsityAccountant(net)
    assert not acc.has_flops and acc.dense_macs_by_layer() is None
    assert "example_input_array" in acc.flops_unavailable_reason
    report = acc.report()
    assert report.totals.flops_ratio is None and all(r.effective_flops is None for r in report.rows)
    assert "unavailable" in " ".join(report.summary_lines())
    assert acc.set_example_input(torch.randn(3, 1, 28, 28))  # arrives later: FLOPs from then on
    assert acc.snapshot().dense_flops == 2_293_000


def test_untraceable_model_reports_counts_with_a_reason():
    net = nn.Linear(4, 2)
    acc = SparsityAccountant(net, torch.randn(2, 5))  # wrong feature size: the trace fails
    stats = acc.snapshot()
    assert stats.dense_flops is None and stats.params_total == 10
    assert "fvcore could not count" in acc.flops_unavailable_reason


def test_snapshot_reuses_given_kept_counts():
    net = LeNet5()
    masks = inject_masks(net)
    acc = SparsityAccountant(net, torch.randn(1, 1, 28, 28))
    given = {name: torch.tensor(mask.numel_connections // 2) for name, mask in masks.items()}
    stats = acc.snapshot(kept_by_layer=given)
    assert stats.connections_kept == 430_500 // 2 and stats.effective_flops == 2_293_000 // 2


# ---------------------------------------------------------------------------------------------------- report


def test_report_files_and_plots(tmp_path):
    net = LeNet5()
    masks = inject_masks(net)
    switch_off(masks["fc1"], (slice(0, 250),))
    report = sparsity_report(net, torch.randn(1, 1, 28, 28))
    with (report.to_csv(tmp_path / "r.csv")).open() as fh:
        lines = list(csv.DictReader(fh))
    assert [line["name"] for line in lines] == ["conv1", "conv2", "fc1", "fc2", "total"]
    assert lines[2]["shape"] == "500x800" and float(lines[2]["density"]) == 0.5
    assert int(lines[-1]["effective_flops"]) == report.totals.effective_flops
    data = json.loads(report.to_json(tmp_path / "r.json").read_text())
    assert data["totals"]["params_kept"] == report.totals.params_kept
    assert "multiply-accumulates" in data["flops_unit"]
    plot_layer_density(report, tmp_path / "density.png")
    plot_history([{"step": s, "density": 1 - s / 10, "flops_ratio": None} for s in range(5)], tmp_path / "h.png")
    for name in ("density.png", "h.png"):
        from PIL import Image

        with Image.open(tmp_path / name) as image:
            image.verify()
            assert image.format == "PNG" and image.size[0] > 100


def test_report_table_prints(capsys):
    net = ResidualNet()
    inject_masks(net)
    from rich.console import Console

    sparsity_report(net, torch.randn(1, 3, 8, 8)).print(Console(width=150, force_terminal=False))
    out = capsys.readouterr().out
    assert "conv_a" in out and "Eff. FLOPs" in out and "(other ops)" in out and "Params kept" in out


def test_report_from_checkpoint_with_and_without_model_class(tmp_path):
    class Wrapped(nn.Module):
        def __init__(self, width: int = 500) -> None:
            super().__init__()
            self.net = LeNet5()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model = Wrapped()
    masks = inject_masks(model, granularity="channel")
    switch_off(masks["net.conv2"], (slice(0, 10),))
    path = tmp_path / "last.ckpt"
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": {"width": 500},
            "lightning_scl": {"scl": {"layers": list(masks), "granularity": "channel"}},
        },
        path,
    )
    x = torch.randn(1, 1, 28, 28)
    expected = sparsity_report(model, x)
    counts_only = sparsity_report(path)
    assert counts_only.totals.params_kept == expected.totals.params_kept
    assert counts_only.totals.connections_kept == expected.totals.connections_kept
    assert [(r.name, r.kept, r.density) for r in counts_only.rows] == [
        (r.name, r.kept, r.density) for r in expected.rows
    ]
    assert counts_only.totals.dense_flops is None and "model_class" in counts_only.flops_note
    rebuilt = sparsity_report(path, example_input=x, model_class=Wrapped)
    assert rebuilt.totals == expected.totals


def test_strip_masks_then_report_is_dense():
    net = LeNet5()
    masks = inject_masks(net)
    switch_off(masks["fc1"], (slice(0, 250),))
    strip_masks(net)
    report = sparsity_report(net, torch.randn(1, 1, 28, 28))
    assert report.totals.flops_ratio == 1.0 and not any(r.masked for r in report.rows)


@pytest.mark.parametrize("cls, shape", [(nn.Conv1d, (1, 3, 6)), (nn.Conv2d, (1, 3, 6, 6))])
def test_string_padding_convolutions_are_counted_like_numeric_padding(cls, shape):
    # padding="same" runs aten::_convolution_mode, which fvcore has no formula for: it counted 0 MACs
    import warnings

    def flops(padding):
        net = nn.Sequential(cls(3, 4, 3, padding=padding), nn.ReLU(), cls(4, 2, 1))
        inject_masks(net, granularity="channel")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # and without a warning about uncounted layers
            report = sparsity_report(net, torch.randn(shape))
        return {row.name: row.dense_flops for row in report.rows}, report.totals.dense_flops

    assert flops("same") == flops(1)
    (valid, _), (numeric, _) = flops("valid"), flops(0)
    assert valid == numeric and valid["0"] > 0
