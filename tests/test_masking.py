"""Mask math: STE gradients, gating, normalization, injection, folding (pure torch)."""

import pytest
import torch
from torch import nn

from lightning_scl.masking import (
    ConnectivityMask,
    _count_positive,
    count_connections,
    fold_state_dict,
    gate_values,
    has_masks,
    inject_masks,
    iter_masks,
    mask_gradient_statistic,
    masked_weight,
    normalize_mask_gradient_,
    strip_masks,
)
from lightning_scl.targets import select_layers


def _grads(ste: str, slope: float = 0.1):
    torch.manual_seed(0)
    w = torch.randn(5, 7, requires_grad=True)
    m = torch.randn(5, 7, requires_grad=True)
    upstream = torch.randn(5, 7)
    out = masked_weight(w, m, ste=ste, slope=slope)
    out.backward(upstream)
    return w, m, upstream


def test_forward_is_weight_times_unit_step():
    w = torch.tensor([[1.0, 2.0, 3.0]])
    m = torch.tensor([[0.5, 0.0, -0.1]])
    assert torch.equal(masked_weight(w, m), torch.tensor([[1.0, 0.0, 0.0]]))


@pytest.mark.parametrize(
    ("ste", "proxy"),
    [
        ("identity", lambda m: torch.ones_like(m)),
        ("leaky_relu", lambda m: torch.where(m > 0, torch.ones_like(m), torch.full_like(m, 0.1))),
        ("softplus", torch.sigmoid),
    ],
)
def test_ste_gradient_matches_formula(ste, proxy):
    w, m, upstream = _grads(ste)
    expected = upstream * w.detach() * proxy(m.detach())
    torch.testing.assert_close(m.grad, expected)


def test_identity_ste_mask_gradient_is_grad_times_weight():
    w, m, upstream = _grads("identity")
    assert torch.equal(m.grad, upstream * w.detach())


def test_switched_off_weights_get_no_task_gradient():
    w, m, upstream = _grads("identity")
    off = m.detach() <= 0
    assert off.any() and (~off).any()
    assert torch.all(w.grad[off] == 0)
    assert torch.equal(w.grad[~off], upstream[~off])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_shape", [(6, 5, 3, 3), (6, 1, 1, 1)], ids=["weight", "channel"])
def test_float_gate_gives_the_values_of_where_on_a_bool_gate(dtype, mask_shape):
    # The mask multiplies by a 0/1 gate for speed; values and gradients must be those of where(mask > 0, ., 0).
    torch.manual_seed(2)
    w = torch.randn(6, 5, 3, 3).to(dtype).requires_grad_()
    m = torch.randn(mask_shape)
    m.view(-1)[:2] = torch.tensor([0.0, float("nan")])  # exactly at the threshold, and NaN: both off
    gate = m > 0
    upstream = torch.randn(6, 5, 3, 3).to(dtype)
    out = masked_weight(w, m)
    out.backward(upstream)
    assert out.dtype == dtype
    expected = torch.where(gate, w.detach(), 0.0)
    assert torch.equal(out, expected)
    assert torch.equal(out.signbit(), expected.signbit())  # switched-off weights read +0.0, never -0.0
    assert torch.equal(w.grad, torch.where(gate, upstream, 0.0))
    assert torch.equal(gate_values(m, dtype), gate.to(dtype))


def test_channel_mask_gradient_sums_over_fan_in():
    torch.manual_seed(1)
    w = torch.randn(4, 3, 2, 2, requires_grad=True)
    m = torch.tensor([1.0, -1.0, 2.0, 0.5]).view(4, 1, 1, 1).requires_grad_()
    upstream = torch.randn(4, 3, 2, 2)
    masked_weight(w, m).backward(upstream)
    expected = (upstream * w.detach()).sum(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(m.grad, expected)
    assert torch.all(w.grad[1] == 0)


@pytest.mark.parametrize("statistic", ["mean_abs", "l2", "max_abs"])
@pytest.mark.parametrize("feature_dim", [0, 1])
def test_normalization_gives_statistic_one_per_feature(statistic, feature_dim):
    torch.manual_seed(2)
    grad = (torch.randn(6, 5, 3) * torch.logspace(-6, 3, 6).view(6, 1, 1)).movedim(0, feature_dim).contiguous()
    normalize_mask_gradient_(grad, feature_dim=feature_dim, statistic=statistic)
    rows = grad.movedim(feature_dim, 0).reshape(grad.shape[feature_dim], -1)
    stat = {
        "mean_abs": rows.abs().mean(1),
        "l2": rows.square().mean(1).sqrt(),
        "max_abs": rows.abs().amax(1),
    }[statistic]
    torch.testing.assert_close(stat, torch.ones_like(stat))


@pytest.mark.parametrize("statistic", ["mean_abs", "l2", "max_abs"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_statistic_is_non_finite_exactly_in_rows_with_a_non_finite_gradient(statistic, bad):
    # The callback relies on this to skip a step with NaN/inf mask gradients without a separate pass.
    grad = torch.randn(4, 6)
    grad[2, 3] = bad
    finite = torch.isfinite(mask_gradient_statistic(grad, 0, statistic))
    assert finite.tolist() == [True, True, False, True]
    assert not torch.isfinite(mask_gradient_statistic(grad, 0, statistic, per_feature=False)).all()


@pytest.mark.parametrize("numel", [1000, 2**24 + 5])
def test_kept_count_is_exact_on_both_summation_paths(numel):
    # float32 sums of 0/1 are exact only below 2**24 entries; larger tensors must take the float64 path.
    values = torch.full((numel,), 0.5)
    values[:3] = -0.5
    values[3] = 0.0  # the threshold itself is switched off
    expected = numel - 4  # 2**24 + 1 for the large tensor: not representable in float32
    count = _count_positive(values)
    assert count.dtype == torch.int64
    assert int(count) == expected == int((values > 0).sum())


def test_normalization_keeps_zero_rows_zero_and_none_is_identity():
    grad = torch.tensor([[0.0, 0.0], [2.0, -2.0]])
    normalize_mask_gradient_(grad, 0)
    assert torch.equal(grad, torch.tensor([[0.0, 0.0], [1.0, -1.0]]))
    before = torch.tensor([[3.0, 4.0]])
    assert torch.equal(normalize_mask_gradient_(before.clone(), 0, "none"), before)


def test_normalization_whole_layer_for_channel_masks():
    grad = torch.tensor([1.0, 3.0]).view(2, 1)
    normalize_mask_gradient_(grad, 0, "mean_abs", per_feature=False)
    assert torch.equal(grad.view(-1), torch.tensor([0.5, 1.5]))


def test_inject_is_idempotent_and_masks_live_in_state_dict():
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
    first = inject_masks(net)
    second = inject_masks(net)
    assert list(first) == ["0", "3"] and all(first[k] is second[k] for k in first)
    keys = set(net.state_dict())
    assert "0.parametrizations.weight.original" in keys and "0.parametrizations.weight.0.mask" in keys
    assert "3.bias" in keys
    assert has_masks(net)


def test_biases_and_norm_layers_are_never_masked():
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.LayerNorm([3, 2, 2]), nn.Embedding(3, 2))
    inject_masks(net)
    assert [name for name, _, _ in iter_masks(net)] == ["0"]
    assert not any("bias" in k and "mask" in k for k in net.state_dict())


def test_shared_module_and_tied_weights_get_one_mask():
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    masks = inject_masks(net)
    assert list(masks) == ["0"]
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    tied = nn.Sequential(a, b)
    masks = inject_masks(tied)
    assert masks["0"] is masks["1"]
    assert len([p for p in tied.parameters() if p.dim() == 2]) == 2  # one weight + one mask


def test_fold_state_dict_matches_masked_outputs_and_original_keys():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    plain_keys = list(net.state_dict())
    masks = inject_masks(net)
    with torch.no_grad():
        for mask in masks.values():
            mask.mask.copy_(torch.randn_like(mask.mask))
    x = torch.randn(4, 6)
    expected = net(x)
    folded = fold_state_dict(net.state_dict())
    assert list(folded) == plain_keys
    fresh = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    fresh.load_state_dict(folded, strict=True)
    assert torch.equal(fresh(x), expected)


def test_strip_masks_folds_in_place():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 3))
    masks = inject_masks(net)
    with torch.no_grad():
        masks["0"].mask[0] = -1
    x = torch.randn(2, 3)
    expected = net(x)
    strip_masks(net)
    assert not has_masks(net) and isinstance(net[0].weight, nn.Parameter)
    assert torch.equal(net(x), expected)
    assert torch.all(net[0].weight[0] == 0)


def test_count_connections_weight_and_channel():
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4, 3))
    masks = inject_masks(net, granularity="channel")
    with torch.no_grad():
        masks["0"].mask[1] = -1.0
    assert masks["0"].mask.shape == (4, 1, 1, 1)
    assert count_connections(net) == (3 * 18 + 12, 4 * 18 + 12)


def test_transposed_conv_features_on_dim_one():
    net = nn.Sequential(nn.ConvTranspose2d(3, 5, 2))
    masks = inject_masks(net, granularity="channel")
    assert masks["0"].feature_dim == 1 and masks["0"].mask.shape == (1, 5, 1, 1)


def test_masks_stay_float32_and_bf16_weight_forward():
    layer = nn.Linear(3, 2).to(torch.bfloat16)
    p = ConnectivityMask(layer.weight.shape)
    assert p.mask.dtype == torch.float32
    assert p(layer.weight).dtype == torch.bfloat16


def test_select_layers_errors_list_candidates():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(ValueError, match=r"matches no maskable layer.*Candidates: \['0'\]"):
        select_layers(net, include=("fc*",))
    with pytest.raises(ValueError, match="No layer selected"):
        select_layers(net, exclude=("*",))
    with pytest.raises(ValueError, match=r"not a torch\.nn layer class"):
        select_layers(net, layer_types=("Linearr",))
    with pytest.raises(ValueError, match="not a valid regular expression"):
        select_layers(net, include=("re:[",))


def test_select_layers_type_and_regex_filters():
    net = nn.Sequential(nn.Conv1d(1, 2, 1), nn.Linear(2, 2), nn.Linear(2, 2))
    assert [n for n, _ in select_layers(net, layer_types=("Conv1d",))] == ["0"]
    assert [n for n, _ in select_layers(net, include=("re:^[12]$",), exclude=("2",))] == ["1"]
    assert [n for n, _ in select_layers(net, layer_types=("torch.nn.Linear",))] == ["1", "2"]


def test_lazy_layer_is_a_clear_error():
    net = nn.Sequential(nn.LazyLinear(2))
    with pytest.raises(ValueError, match="uninitialized"):
        inject_masks(net, layers=[("0", net[0])])


def test_strip_masks_on_a_deepcopy_leaves_the_original_intact():
    import copy

    net = nn.Sequential(nn.Linear(3, 4))
    inject_masks(net)
    clone = copy.deepcopy(net)
    strip_masks(clone)
    assert has_masks(net) and not has_masks(clone)
    x = torch.randn(2, 3)
    assert torch.equal(net(x), clone(x))
    assert type(clone[0]) is nn.Linear


def _forward_gate(net: nn.Linear) -> torch.Tensor:
    """The 0/1 pattern the masked forward pass applies: zero weights read as switched off."""
    with torch.no_grad():
        return (net.weight != 0).float()


def test_cached_gate_follows_every_visible_change_of_the_mask():
    torch.manual_seed(0)
    net = nn.Linear(6, 4)
    with torch.no_grad():
        net.weight.copy_(torch.randn(4, 6).abs() + 0.1)  # no zero weights: a zero in the output means "masked"
    mask = inject_masks(net, layers=[("", net)])[""]
    first = mask.gate_values(torch.float32)
    assert mask.gate_values(torch.float32) is first  # computed once per mask state
    assert mask.gate_values(torch.float64).dtype == torch.float64  # another dtype is not served from the cache

    with torch.no_grad():
        mask.mask[0, :3] = -1.0  # in-place write
    assert torch.equal(_forward_gate(net), (mask.mask > 0).float()) and int(mask.kept_tensor()) == 21

    # a fused CPU optimizer writes without bumping the version; the callback bumps it (increment_version)
    mask.mask.grad = torch.ones_like(mask.mask)
    torch.optim.SGD([mask.mask], lr=3.0, fused=True).step()
    torch.autograd.graph.increment_version(mask.mask)
    assert not (mask.mask > 0).any() and int(mask.kept_tensor()) == 0 and not _forward_gate(net).any()

    net.load_state_dict({**net.state_dict(), "parametrizations.weight.0.mask": torch.ones(4, 6)})
    assert _forward_gate(net).all() and int(mask.kept_tensor()) == 24

    mask.mask.data = -torch.ones(4, 6)  # new storage
    assert not _forward_gate(net).any()

    # a write torch cannot see is served stale until forget_gate, as the class documents
    mask.mask.data.fill_(1.0)
    assert not _forward_gate(net).any()
    mask.forget_gate()
    assert _forward_gate(net).all() and mask.kept() == 24


def test_copies_and_pickles_drop_the_cached_gate():
    import copy
    import pickle

    net = nn.Linear(3, 2)
    mask = inject_masks(net, layers=[("", net)])[""]
    mask.gate_values(torch.float32)
    assert mask._gate_cache is not None
    clone = copy.deepcopy(net)  # torch refuses to pickle a parametrized module; the mask alone pickles
    for clone_mask in (clone.parametrizations.weight[0], pickle.loads(pickle.dumps(mask))):
        assert clone_mask._gate_cache is None
        with torch.no_grad():
            clone_mask.mask.fill_(-1.0)
        assert not clone_mask(torch.ones(2, 3)).any()  # each copy gates with its own mask
    assert not clone.weight.any() and net.weight.all()
    state = mask.__dict__.copy()
    del state["_gate_cache"]  # a module pickled before the cache existed
    old = ConnectivityMask.__new__(ConnectivityMask)
    old.__setstate__(state)
    assert old.gate_values(torch.float32).shape == (2, 3)


def test_gradients_flow_through_a_cached_gate_and_a_retained_graph_sees_mask_updates():
    torch.manual_seed(1)
    net = nn.Linear(5, 3)
    mask = inject_masks(net, layers=[("", net)])[""]
    x = torch.randn(8, 5)
    for _ in range(2):  # the second pass reuses the first pass's gate
        net.weight.grad = None
        mask.mask.grad = None
        net(x).sum().backward()
    expected = torch.ones(8, 3).t() @ x  # dL/dW_eff of sum(x W^T + b)
    torch.testing.assert_close(mask.mask.grad, expected * net.parametrizations.weight.original.detach())
    out = net(x).sum()
    with torch.no_grad():
        mask.mask[0, 0] = -1.0
    # the graph saved the mask and its gate; changing the mask before backward must fail loudly, not mix states
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_a_gate_made_under_inference_mode_is_not_kept_for_training():
    # Lightning validates and tests under torch.inference_mode; the next training forward must still backpropagate.
    net = nn.Linear(4, 3)
    mask = inject_masks(net, layers=[("", net)])[""]
    x = torch.randn(2, 4)
    with torch.no_grad():
        mask.mask[0, 0] = -1.0  # the mask changed (a training step): the next forward makes a new gate
    with torch.inference_mode():
        evaluated = net(x)
    assert mask._cached_gate() is None
    net(x).sum().backward()
    assert mask.mask.grad is not None and torch.equal(net(x).detach(), evaluated)
    with torch.inference_mode():  # a kept (normal) gate serves inference passes
        assert net(x).shape == (2, 3) and mask._gate_cache is not None


def test_functional_call_with_other_masks_gates_with_those_masks():
    from torch.func import functional_call

    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    mask = inject_masks(net, layers=[("", net)])[""]
    original = net.parametrizations.weight.original
    x = torch.randn(2, 4)
    kept_before = mask.kept()
    for sign in (1.0, -1.0, 1.0, -1.0):  # fresh tensors, freed after each pass: addresses may repeat
        other = torch.full((3, 4), sign)
        out = functional_call(net, {"parametrizations.weight.0.mask": other}, (x,))
        torch.testing.assert_close(out, x @ torch.where(other > 0, original, 0.0).t() + net.bias)
        del other
    assert mask.kept() == kept_before and torch.equal(net.weight, original)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_frozen_mask_gives_the_same_weight_and_gradient_without_a_python_node(dtype):
    weight = torch.tensor([[1.5, -2.0], [-0.5, 3.0]], dtype=dtype, requires_grad=True)
    p = ConnectivityMask((2, 2))
    with torch.no_grad():
        p.mask.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    grad_out = torch.tensor([[0.3, -0.7], [1.1, 2.0]], dtype=dtype)
    trained = p(weight)
    (trainable_grad,) = torch.autograd.grad(trained, weight, grad_out)
    p.mask.requires_grad_(False)
    frozen = p(weight)
    (frozen_grad,) = torch.autograd.grad(frozen, weight, grad_out)
    assert type(frozen.grad_fn).__name__ == "AddcmulBackward0"  # built-in autograd, no Python backward
    assert torch.equal(frozen, trained) and torch.equal(frozen_grad, trainable_grad)
    assert str(frozen[0, 1].item()) == "0.0"  # a switched-off negative weight is +0.0, as ``where`` gives


class _TiedAutoencoder(nn.Module):
    """A decoder ConvTranspose2d tied to the encoder Conv2d's weight: output channels along dim 0 vs dim 1."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = nn.Conv2d(3, 8, 3), nn.ConvTranspose2d(8, 3, 3)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


def test_a_weight_tied_to_a_transposed_convolution():
    # channel masks cannot serve both kinds: refused before anything is registered (it left 'enc' masked and
    # untied, and a retry then masked one use of the weight only)
    net = _TiedAutoencoder()
    with pytest.raises(ValueError, match=r"'enc' and 'dec' share \(tie\) one weight.*granularity='weight'"):
        inject_masks(net, granularity="channel")
    assert not has_masks(net) and net.enc.weight is net.dec.weight
    # a weight mask has the weight's own shape: one mask serves both
    masks = inject_masks(net, granularity="weight")
    assert masks["enc"] is masks["dec"]
    with torch.no_grad():
        masks["enc"].mask[0] = -1.0
    assert torch.equal(net.enc.weight, net.dec.weight) and float(net.enc.weight[0].abs().sum()) == 0.0
