"""Property tests (hypothesis): random shapes, densities and dtypes."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_scl.masking import fold_state_dict, inject_masks, masked_weight, normalize_mask_gradient_, strip_masks

DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
shapes = st.lists(st.integers(1, 6), min_size=2, max_size=4).map(tuple)


def _random_mask(shape, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(shape, generator=g) < density, 1.0, -1.0) * torch.rand(shape, generator=g).add(0.1)


@settings(max_examples=40, deadline=None)
@given(shape=shapes, density=st.floats(0.0, 1.0), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_fold_and_strip_are_exact(shape, density, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    conv_like = len(shape) > 2
    layer = torch.nn.Conv1d(shape[1], shape[0], shape[2]) if conv_like else torch.nn.Linear(shape[1], shape[0])
    if len(shape) > 3:
        layer = torch.nn.Conv2d(shape[1], shape[0], (shape[2], shape[3]))
    layer = layer.to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g).to(dtype))
    masks = inject_masks(layer, layers=[("", layer)])
    with torch.no_grad():
        masks[""].mask.copy_(_random_mask(masks[""].mask.shape, density, seed))
    expected = layer.weight.detach().clone()
    gate = masks[""].mask > 0
    assert torch.equal(expected, layer.parametrizations.weight.original.detach() * gate.to(dtype))
    folded = fold_state_dict(layer.state_dict())
    assert torch.equal(folded["weight"], expected) and folded["weight"].dtype == dtype
    strip_masks(layer)
    assert torch.equal(layer.weight.detach(), expected)


@settings(max_examples=40, deadline=None)
@given(
    shape=shapes,
    feature_dim=st.integers(0, 1),
    statistic=st.sampled_from(["mean_abs", "l2", "max_abs"]),
    log_scale=st.floats(-8, 8),
    seed=st.integers(0, 2**16),
)
def test_normalization_statistic_is_one_per_nonzero_feature(shape, feature_dim, statistic, log_scale, seed):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(shape, generator=g) * 10**log_scale
    normalize_mask_gradient_(grad, feature_dim, statistic)
    rows = grad.movedim(feature_dim, 0).reshape(shape[feature_dim], -1)
    stat = {"mean_abs": rows.abs().mean(1), "l2": rows.square().mean(1).sqrt(), "max_abs": rows.abs().amax(1)}[
        statistic
    ]
    torch.testing.assert_close(stat, torch.ones_like(stat), rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    shape=shapes,
    ste=st.sampled_from(["identity", "leaky_relu", "softplus"]),
    slope=st.floats(0.01, 1.0),
    channel=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_ste_gradients_match_formulas(shape, ste, slope, channel, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    mask_shape = (shape[0],) + (1,) * (len(shape) - 1) if channel else shape
    m = torch.randn(mask_shape, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(shape, generator=g, dtype=torch.float64)
    masked_weight(w, m, ste, slope).backward(upstream)
    md = m.detach()
    proxy = {
        "identity": torch.ones_like(md),
        "leaky_relu": torch.where(md > 0, 1.0, slope).to(md.dtype),
        "softplus": torch.sigmoid(md),
    }[ste]
    task = upstream * w.detach()
    if channel:
        task = task.sum(dim=tuple(range(1, len(shape))), keepdim=True)
    torch.testing.assert_close(m.grad, task * proxy)
    torch.testing.assert_close(w.grad, upstream * (md > 0).to(upstream.dtype))


@settings(max_examples=25, deadline=None)
@given(
    out_features=st.integers(1, 9),
    in_features=st.integers(1, 70),
    density=st.floats(0.0, 1.0),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_compressed_export_round_trip_is_bit_exact(out_features, in_features, density, dtype, seed):
    import tempfile
    from pathlib import Path

    from lightning_scl.export import export_pruned, load_pruned

    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(in_features, out_features)).to(dtype)
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(net[0].weight.shape, generator=g).to(dtype))
    masks = inject_masks(net)
    with torch.no_grad():
        masks["0"].mask.copy_(_random_mask(masks["0"].mask.shape, density, seed))
    expected = fold_state_dict(net.state_dict())
    dtype_name = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype]
    with tempfile.TemporaryDirectory() as tmp:
        path = export_pruned(net, Path(tmp) / "m.safetensors", format="compressed", dtype=dtype_name)
        restored = load_pruned(path)
    assert list(restored) == list(expected)
    for key in expected:
        assert restored[key].dtype == expected[key].dtype
        assert torch.equal(restored[key], expected[key]), key
