"""SparseConnectivityLearning through a real Trainer: optimizer groups, the step, schedules, logging, checkpoints."""

from __future__ import annotations

import csv
import math
import warnings

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_scl.callbacks.scl import SparseConnectivityLearning
from lightning_scl.masking import ConnectivityMask
from tests.conftest import MLP, loader, quiet_trainer


def masks_of(scl: SparseConnectivityLearning) -> dict[str, torch.Tensor]:
    return {name: mask.mask.detach().clone() for name, mask in scl.masks.items()}


def fit(model, callbacks, data=None, **trainer_kwargs):
    trainer_kwargs.setdefault("max_epochs", 1)
    trainer = quiet_trainer(callbacks=callbacks, **trainer_kwargs)
    trainer.fit(model, data if data is not None else loader())
    return trainer


class GradSpy(SparseConnectivityLearning):
    """Records the mask gradients and learning rate the mask optimizer is about to apply."""

    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        self.seen: list[dict[str, torch.Tensor]] = []
        self.lrs: list[float] = []
        step = self._mask_optimizer.step

        def spy_step(*args, **kwargs):
            self.seen.append({name: m.mask.grad.clone() for name, m in self.masks.items()})
            self.lrs.append(self._mask_optimizer.param_groups[0]["lr"])
            return step(*args, **kwargs)

        self._mask_optimizer.step = spy_step


class ZeroTaskLoss(MLP):
    def training_step(self, batch, batch_idx):
        return (self(batch[0]) * 0.0).sum()


def test_masks_get_their_own_optimizer_without_weight_decay():
    torch.manual_seed(0)
    model = MLP(weight_decay=5e-4)
    scl = SparseConnectivityLearning(lam=0.1)
    trainer = fit(model, [scl], max_steps=2)
    mask_ids = {id(m.mask) for m in scl.masks.values()}
    user_params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert len(mask_ids) == 3
    assert not mask_ids & {id(p) for p in user_params}
    assert {id(p) for p in model.parameters()} - mask_ids == {id(p) for p in user_params}
    (group,) = scl._mask_optimizer.param_groups
    assert group["weight_decay"] == 0 and {id(p) for p in group["params"]} == mask_ids
    assert group["lr"] == scl.mask_lr and group["momentum"] == scl.mask_momentum


def test_zero_task_loss_gives_mask_gradient_lam():
    torch.manual_seed(0)
    scl = GradSpy(lam=0.5, mask_lr=0.01, mask_momentum=0.9, fan_in_exponent=0)
    fit(ZeroTaskLoss(), [scl], max_steps=1)
    (grads,) = scl.seen
    for grad in grads.values():
        assert torch.equal(grad, torch.full_like(grad, 0.5))
    for mask in masks_of(scl).values():  # first SGD step: m = m0 - lr * lam
        torch.testing.assert_close(mask, torch.full_like(mask, 1.0 - 0.01 * 0.5))


def test_normalized_task_gradient_has_unit_mean_abs_per_feature():
    torch.manual_seed(0)
    scl = GradSpy(lam=0.0, normalize_over="unit")
    fit(MLP(), [scl], max_steps=1)
    for grad in scl.seen[0].values():
        stat = grad.abs().mean(dim=1)
        alive = stat > 0  # units whose ReLU was inactive on the whole batch have no gradient at all
        assert alive.float().mean() > 0.5
        torch.testing.assert_close(stat[alive], torch.ones_like(stat[alive]))


@pytest.mark.parametrize("scope", ["layer", "network"])
def test_layer_and_network_normalization_keep_the_relative_scale_of_units(scope):
    raw, scoped = GradSpy(lam=0.0, normalize="none"), GradSpy(lam=0.0, normalize_over=scope)
    for scl in (raw, scoped):
        torch.manual_seed(0)
        fit(MLP(), [scl], max_steps=1)
    before = raw.seen[0]  # same seed: the raw task gradients of the same step
    everything = torch.cat([g.view(-1) for g in before.values()])
    for name, grad in scoped.seen[0].items():
        stat = before[name].abs().mean() if scope == "layer" else everything.abs().mean()
        torch.testing.assert_close(grad, before[name] / stat)
        per_unit = grad.abs().mean(dim=1)
        assert per_unit.max() > 1.5 * per_unit[per_unit > 0].min()  # units are not equalized to 1
    if scope == "network":
        means = [g.abs().mean() for g in scoped.seen[0].values()]
        assert max(means) > 1.5 * min(means)  # layers keep their relative scale
        torch.testing.assert_close(
            torch.cat([g.view(-1) for g in scoped.seen[0].values()]).abs().mean(), torch.tensor(1.0)
        )


@pytest.mark.parametrize("statistic", ["mean_abs", "l2", "max_abs"])
def test_network_statistic_equals_the_statistic_of_all_gradients_together(statistic):
    from lightning_scl.callbacks.scl import _network_statistic
    from lightning_scl.masking import mask_gradient_statistic

    torch.manual_seed(0)
    grads = [torch.randn(8, 16) * 0.01, torch.randn(4, 8) * 10.0, torch.randn(3, 4)]
    per_layer = [mask_gradient_statistic(g, 0, statistic, per_feature=False) for g in grads]
    combined = _network_statistic(per_layer, [g.numel() for g in grads], statistic)
    everything = torch.cat([g.view(-1) for g in grads])
    expected = mask_gradient_statistic(everything.view(1, -1), 0, statistic, per_feature=False)
    torch.testing.assert_close(combined, expected)


def test_density_falls_monotonically_as_lam_rises():
    densities = []
    for lam in (0.02, 0.2, 1.0):
        torch.manual_seed(0)
        scl = SparseConnectivityLearning(lam=lam, mask_lr=0.05)
        fit(MLP(), [scl], max_epochs=6)
        densities.append(scl.density)
    assert densities[0] > densities[1] > densities[2]
    assert densities[0] < 1.0


def test_lam_zero_large_init_reproduces_dense_training_exactly():
    runs = []
    for callbacks in ([], [SparseConnectivityLearning(lam=0.0, mask_init=1e6)]):
        L.seed_everything(0)
        model = MLP(weight_decay=5e-4)
        fit(model, callbacks, data=loader(shuffle=True), max_epochs=2)
        runs.append(model)
    dense, scl = runs
    assert len(dense.losses) == 16
    assert dense.losses == scl.losses
    assert torch.equal(dense.head.weight, scl.head.weight)


def test_gradient_accumulation_matches_large_batch():
    results = []
    for batch_size, accumulate in ((32, 1), (8, 4)):
        torch.manual_seed(0)
        scl = SparseConnectivityLearning(lam=0.3, mask_lr=0.05)
        model = MLP()
        fit(model, [scl], data=loader(batch_size=batch_size), max_steps=2, accumulate_grad_batches=accumulate)
        results.append((masks_of(scl), model.head.weight.detach().clone()))
    (masks_a, w_a), (masks_b, w_b) = results
    for name in masks_a:
        torch.testing.assert_close(masks_a[name], masks_b[name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w_a, w_b, rtol=1e-4, atol=1e-5)


def test_bf16_mixed_trains_and_masks_stay_float32():
    torch.manual_seed(0)
    model = MLP()
    scl = SparseConnectivityLearning(lam=0.5, mask_lr=0.05)
    fit(model, [scl], max_epochs=3, precision="bf16-mixed")
    assert all(m.mask.dtype == torch.float32 for m in scl.masks.values())
    assert scl.density < 1.0
    assert all(torch.isfinite(torch.tensor(model.losses)))


def test_gradient_clipping_excludes_mask_gradients():
    """Clipping by norm sees only the user's parameters: masks are stepped (and their gradients cleared) before."""
    runs = []
    for callbacks in ([], [SparseConnectivityLearning(lam=0.0, mask_init=1e6)]):
        torch.manual_seed(0)
        model = MLP()
        fit(model, callbacks, max_steps=3, gradient_clip_val=0.01, gradient_clip_algorithm="norm")
        runs.append(model)
    torch.testing.assert_close(runs[0].head.weight, runs[1].head.weight, rtol=0, atol=0)
    masks = []  # the first mask update does not depend on clipping (later ones see clipped weight updates)
    for clip in (None, 0.01):
        torch.manual_seed(0)
        scl = SparseConnectivityLearning(lam=0.2)
        fit(MLP(), [scl], max_steps=1, gradient_clip_val=clip)
        masks.append(masks_of(scl))
    for name in masks[0]:
        torch.testing.assert_close(masks[0][name], masks[1][name], rtol=0, atol=0)


def test_fan_in_exponent_scales_pressure_by_fan_in_with_mean_one():
    torch.manual_seed(0)
    scl = GradSpy(lam=0.5, mask_lr=0.01, fan_in_exponent=0.5)
    fit(ZeroTaskLoss(), [scl], max_steps=1)
    (grads,) = scl.seen
    fan_in = {"net.0": 16, "net.2": 32, "head": 32}  # MLP: 16 -> 32 -> 32 -> 4
    sizes = {name: mask.mask.numel() for name, mask in scl.masks.items()}
    raw = {name: fan_in[name] ** 0.5 for name in fan_in}
    mean = sum(raw[n] * sizes[n] for n in raw) / sum(sizes.values())
    for name, grad in grads.items():  # zero task loss: the gradient is the pressure alone
        torch.testing.assert_close(grad, torch.full_like(grad, 0.5 * raw[name] / mean))
    assert grads["head"][0, 0] > grads["net.0"][0, 0]  # the wider input gets more pressure per connection


def test_defaults_of_normalization_scope_and_fan_in_exponent():
    default = SparseConnectivityLearning()
    assert (default.normalize_over, default.fan_in_exponent) == ("network", 0.0)
    channel = SparseConnectivityLearning(granularity="channel")
    assert (channel.normalize_over, channel.fan_in_exponent) == ("layer", 0.0)
    # the exponent compensates per-unit normalization, so it is on by default only there
    assert SparseConnectivityLearning(normalize_over="unit").fan_in_exponent == 0.5
    assert SparseConnectivityLearning(normalize_over="unit", fan_in_exponent=0).fan_in_exponent == 0.0


def test_cosine_mask_lr_decays_to_zero_at_the_freeze_point():
    torch.manual_seed(0)
    scl = GradSpy(lam=0.1, mask_lr=0.2, mask_lr_schedule="cosine", freeze_masks_at=0.5)
    fit(MLP(), [scl], max_steps=20, max_epochs=5)  # 8 batches per epoch: the step limit ends the run
    assert len(scl.lrs) == 10  # masks step until half of the 20 steps, then freeze
    assert scl.lrs[0] == pytest.approx(0.2)
    assert all(a > b for a, b in zip(scl.lrs, scl.lrs[1:]))
    assert scl.lrs[5] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))


def test_constant_mask_lr_by_default():
    scl = GradSpy(lam=0.1, mask_lr=0.2, freeze_masks_at=None)
    fit(MLP(), [scl], max_steps=6)
    assert scl.lrs == [0.2] * 6


class FakeLossScale(Callback):
    """fp16 AMP as the masks see it: gradients multiplied by the scaler's scale (CPU has no GradScaler)."""

    scale = 1024.0

    def on_fit_start(self, trainer, pl_module):
        scale = self.scale

        class Scaler:
            def is_enabled(self):
                return True

            def get_scale(self):
                return scale

        trainer.precision_plugin.scaler = Scaler()

    def on_after_backward(self, trainer, pl_module):
        for module in pl_module.modules():
            for mask in getattr(getattr(module, "parametrizations", None), "weight", []):
                if getattr(mask, "mask", None) is not None and mask.mask.grad is not None:
                    mask.mask.grad.mul_(self.scale)


@pytest.mark.parametrize("normalize", ["mean_abs", "none"])
def test_loss_scale_does_not_change_the_mask_update(normalize):
    def run(callbacks):
        torch.manual_seed(0)
        model = MLP()
        scl = SparseConnectivityLearning(lam=0.05, normalize=normalize, mask_lr=0.05, freeze_masks_at=None)
        fit(model, [scl, *callbacks], max_steps=6)
        return masks_of(scl)

    plain, scaled = run([]), run([FakeLossScale()])
    for name in plain:
        torch.testing.assert_close(scaled[name], plain[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(m, torch.ones_like(m)) for m in plain.values())  # the masks did move


class SwitchOffHalfTheHead(Callback):
    """Switches off every other input connection of the head (weight masks) or every other output unit (channel)."""

    def __init__(self, granularity: str = "weight"):
        self.granularity = granularity

    def off_and_on(self, tensor):
        if self.granularity == "weight":
            return tensor[:, ::2], tensor[:, 1::2]
        return tensor[::2], tensor[1::2]

    def on_fit_start(self, trainer, pl_module):
        with torch.no_grad():
            self.off_and_on(pl_module.head.parametrizations.weight[0].mask)[0].fill_(-1e6)  # off for the whole run
        self.initial = pl_module.head.parametrizations.weight.original.detach().clone()


@pytest.mark.parametrize("granularity", ["weight", "channel"])
@pytest.mark.parametrize("protect", [True, False])
def test_pruned_weights_are_protected_from_weight_decay(protect, granularity):
    torch.manual_seed(0)
    model = MLP(weight_decay=0.5)
    switch = SwitchOffHalfTheHead(granularity)
    # Never frozen: once masks are frozen no pruned weight can revive, so protection stops there (tested below).
    scl = SparseConnectivityLearning(
        lam=0.0, protect_pruned_weights=protect, freeze_masks_at=None, granularity=granularity
    )
    fit(model, [scl, switch], max_steps=5)
    off, on = switch.off_and_on(model.head.parametrizations.weight.original.detach())
    initial_off, initial_on = switch.off_and_on(switch.initial)
    assert not torch.equal(on, initial_on)  # weights whose mask is on train normally
    if protect:
        assert torch.equal(off, initial_off)
    else:  # decay alone: w <- w * (1 - lr * wd) with momentum, so every pruned weight shrinks
        assert torch.all(off.abs() < initial_off.abs())


class NonFiniteOnce(Callback):
    """Poisons one mask gradient at a chosen optimizer step and records the masks around it."""

    def __init__(self, scl: SparseConnectivityLearning, at_step: int):
        self.scl, self.at_step, self.before, self.after = scl, at_step, None, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.at_step:
            next(iter(self.scl.masks.values())).mask.grad[0, 0] = float("nan")
            self.before, self.lam_before = masks_of(self.scl), self.scl.lam

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step + 1:
            self.after, self.lam_after = masks_of(self.scl), self.scl.lam


def test_nonfinite_mask_gradient_leaves_masks_and_controller_unchanged():
    torch.manual_seed(0)
    scl = SparseConnectivityLearning(target_density=0.3, mask_lr=0.05)
    poison = NonFiniteOnce(scl, at_step=3)
    with pytest.warns(UserWarning, match="non-finite mask gradients"):
        fit(MLP(), [poison, scl], max_steps=6)
    assert scl.steps_skipped_nonfinite == 1
    for name in poison.before:
        assert torch.equal(poison.before[name], poison.after[name])
    assert poison.lam_before == poison.lam_after


def test_freeze_stops_masks_but_weights_keep_training():
    class Recorder(Callback):
        def __init__(self, scl):
            self.scl, self.history = scl, []

        def on_train_epoch_end(self, trainer, pl_module):
            self.history.append((masks_of(self.scl), pl_module.head.parametrizations.weight.original.clone()))

    torch.manual_seed(0)
    scl = SparseConnectivityLearning(lam=0.3, mask_lr=0.05, freeze_masks_at=2)
    recorder = Recorder(scl)
    fit(MLP(), [scl, recorder], max_epochs=4)
    (m1, _), (m2, w2), (m3, w3), _ = recorder.history
    assert scl.frozen
    assert any(not torch.equal(m1[k], m2[k]) for k in m1)  # epoch 2 (index 1) still learned masks
    assert all(torch.equal(m2[k], m3[k]) for k in m2)  # frozen from epoch 2 on
    assert not torch.equal(w2, w3)


def test_weights_with_mask_off_do_not_affect_output():
    torch.manual_seed(0)
    model = MLP()
    scl = SparseConnectivityLearning(lam=1.0, mask_lr=0.1)
    fit(model, [scl], max_epochs=2)
    x = torch.randn(5, 16)
    before = model(x)
    with torch.no_grad():
        for name, mask in scl.masks.items():
            original = model.get_submodule(name).parametrizations.weight.original
            original[~mask.gate().expand_as(original)] = 123.0
    torch.testing.assert_close(model(x), before)


def test_every_forward_gates_with_the_masks_as_they_are_now():
    # The masks cache their 0/1 gate per state; the CPU mask optimizer is fused, and its writes are invisible to
    # the version counter the cache keys on unless the callback bumps it. A stale gate would show up here.
    class GateCheck(Callback):
        steps_checked = 0
        counts: list[int] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            for name, mask in scl.masks.items():
                layer = pl_module.get_submodule(name)
                original = layer.parametrizations.weight.original
                assert torch.equal(layer.weight, torch.where(mask.mask > 0, original, 0.0)), (name, batch_idx)
                assert int(mask.kept_tensor()) == int((mask.mask > 0).sum())
            self.counts.append(sum(int((m.mask > 0).sum()) for m in scl.masks.values()))
            self.steps_checked += 1

    torch.manual_seed(0)
    scl = SparseConnectivityLearning(lam=2.0, mask_lr=0.2, freeze_masks_at=None)
    check = GateCheck()
    fit(MLP(), [scl, check], max_epochs=2)
    assert scl._fused_mask_optimizer
    assert check.steps_checked > 5
    assert len(set(check.counts)) > 3  # the masks kept changing while they were checked


def test_frozen_steps_reuse_one_gate_and_mask_training_steps_make_one_per_step():
    class GateSeen(Callback):
        seen: list[tuple[bool, torch.Tensor]] = []

        def on_before_backward(self, trainer, pl_module, loss):
            gate = next(iter(scl.masks.values()))._cached_gate()
            assert gate is not None  # the gate this step's forward pass used
            self.seen.append((scl.frozen, gate))

    torch.manual_seed(0)
    scl = SparseConnectivityLearning(lam=1.0, mask_lr=0.1, freeze_masks_at=0.5)
    seen = GateSeen()
    fit(MLP(), [scl, seen], max_epochs=2)
    frozen = [gate for is_frozen, gate in seen.seen if is_frozen]
    training = [gate for is_frozen, gate in seen.seen if not is_frozen]
    assert len(frozen) > 3 and all(gate is frozen[0] for gate in frozen)  # never recomputed after the freeze
    assert len(training) > 3 and len({id(gate) for gate in training}) == len(training)  # one per mask update


def test_training_after_testing_a_reloaded_checkpoint(tmp_path):
    # trainer.test reloads the checkpoint (a new mask state) and runs under inference_mode; whatever gate that makes
    # must not reach a later forward with autograd on, nor a second fit.
    torch.manual_seed(0)
    model = MLP()
    scl = SparseConnectivityLearning(lam=1.0, mask_lr=0.1)
    trainer = fit(model, [scl], max_epochs=1)
    path = tmp_path / "masked.ckpt"
    trainer.save_checkpoint(path)
    trainer.test(model, loader(), ckpt_path=path, verbose=False)
    layer = next(iter(scl.masks))
    model.get_submodule(layer).weight.sum().backward()  # autograd on, outside any loop
    fit(model, [SparseConnectivityLearning(lam=1.0, mask_lr=0.1)], max_epochs=1)
    for name, mask in scl.masks.items():
        original = model.get_submodule(name).parametrizations.weight.original
        assert torch.equal(model.get_submodule(name).weight, torch.where(mask.mask > 0, original, 0.0))


def test_idempotent_setup_across_fit_validate_test_predict():
    torch.manual_seed(0)
    model = MLP()
    scl = SparseConnectivityLearning(lam=0.1)
    trainer = fit(model, [scl], max_epochs=1)
    masks = masks_of(scl)
    trainer.validate(model, loader())
    trainer.test(model, loader())
    trainer.predict(model, loader())
    trainer2 = quiet_trainer(callbacks=[scl], max_epochs=1)
    trainer2.fit(model, loader())
    assert len(scl.masks) == 3
    for name in masks:
        assert len(model.get_submodule(name).parametrizations.weight) == 1
    assert "configure_optimizers" not in vars(model)  # the temporary wrapper was removed at teardown


def test_layers_created_in_configure_model_get_masks():
    class Lazy(MLP):
        def __init__(self):
            super().__init__()
            self.extra = None

        def configure_model(self):
            if self.extra is None:
                self.extra = nn.Linear(4, 4)

        def forward(self, x):
            return self.extra(super().forward(x))

    torch.manual_seed(0)
    scl = SparseConnectivityLearning(lam=0.1)
    model = Lazy()
    fit(model, [scl], max_steps=2)
    assert "extra" in scl.masks


def test_include_exclude_patterns_select_layers():
    torch.manual_seed(0)
    scl = SparseConnectivityLearning(lam=0.1, exclude=["head"])
    fit(MLP(), [scl], max_steps=1)
    assert sorted(scl.masks) == ["net.0", "net.2"]
    scl = SparseConnectivityLearning(lam=0.1, include=["re:^net\\.2$"])
    fit(MLP(), [scl], max_steps=1)
    assert list(scl.masks) == ["net.2"]


def test_selecting_nothing_is_an_error_listing_candidates():
    with pytest.raises(ValueError, match=r"matches no maskable layer.*'net.0'"):
        fit(MLP(), [SparseConnectivityLearning(include=["encoder.*"])], max_steps=1)


def test_an_exclude_pattern_that_matches_nothing_is_named_in_a_warning():
    scl = SparseConnectivityLearning(lam=0.1, exclude=["model.fc3"], report=False)  # a typo: the head is "head"
    with pytest.warns(UserWarning, match=r"exclude pattern 'model.fc3' matches no maskable layer.*'head'"):
        fit(MLP(), [scl], max_steps=1)
    assert sorted(scl.masks) == ["head", "net.0", "net.2"]


def test_logs_density_connections_lambda_reg_loss(tmp_path):
    torch.manual_seed(0)
    scl = SparseConnectivityLearning(lam=0.2, log_per_layer=True, fan_in_exponent=0)
    logger = CSVLogger(tmp_path, name="run")
    fit(MLP(), [scl], max_epochs=2, logger=logger, log_every_n_steps=2)
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    columns = set(rows[0])
    for key in ("scl/density", "scl/connections", "scl/lambda", "scl/reg_loss", "scl/density/head"):
        assert key in columns
    last = [r for r in rows if r["scl/density"]][-1]
    assert float(last["scl/lambda"]) == pytest.approx(0.2)
    kept = float(last["scl/connections"])
    assert 0 < kept <= 16 * 32 + 32 * 32 + 32 * 4
    assert float(last["scl/reg_loss"]) == pytest.approx(0.2 * kept, rel=1e-6)


def test_metrics_keep_coming_after_the_freeze(tmp_path):
    torch.manual_seed(0)
    scl = SparseConnectivityLearning(lam=0.2, freeze_masks_at=0.5)
    logger = CSVLogger(tmp_path, name="run")
    fit(MLP(), [scl], max_epochs=1, logger=logger, log_every_n_steps=1)  # 8 optimizer steps
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        steps = [int(r["step"]) for r in csv.DictReader(fh) if r.get("scl/density")]
    assert scl.frozen
    assert steps == list(range(8))


class GradFlagSpy(Callback):
    def __init__(self, scl):
        self.scl, self.seen = scl, []

    def on_after_backward(self, trainer, pl_module):
        mask = next(iter(self.scl.masks.values())).mask
        self.seen.append((self.scl.frozen, mask.requires_grad, mask.grad is not None))


def test_frozen_masks_skip_their_gradient_and_are_trainable_again_after_fit():
    torch.manual_seed(0)
    scl = SparseConnectivityLearning(lam=0.2, freeze_masks_at=0.5)
    spy = GradFlagSpy(scl)
    model = MLP()
    fit(model, [scl, spy], max_epochs=1)  # 8 optimizer steps, frozen from step 4
    assert spy.seen[:4] == [(False, True, True)] * 4
    assert spy.seen[5:] == [(True, False, False)] * 3  # backward no longer computes g * W for the masks
    assert all(mask.mask.requires_grad for mask in scl.masks.values())


def test_progress_bar_shows_density(capsys):
    torch.manual_seed(0)
    trainer = fit(MLP(), [SparseConnectivityLearning(lam=0.1)], max_steps=3, enable_progress_bar=True)
    assert "density" in trainer.progress_bar_metrics


class StopAfterEpoch(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 == self.epoch:
            trainer.should_stop = True


def _checkpointing_fit(tmp_path, epochs, ckpt_path=None, stop_after=None, **scl_kwargs):
    torch.manual_seed(0)
    model = MLP(weight_decay=1e-3)
    scl = SparseConnectivityLearning(**scl_kwargs)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=-1, every_n_epochs=1)
    callbacks = [scl, checkpoint] + ([StopAfterEpoch(stop_after)] if stop_after else [])
    trainer = quiet_trainer(callbacks=callbacks, max_epochs=epochs, enable_checkpointing=True)
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return model, scl


def test_resume_gives_identical_masks_weights_and_controller(tmp_path):
    kwargs = dict(target_density=0.3, mask_lr=0.05)
    straight, scl_a = _checkpointing_fit(tmp_path / "a", 3, **kwargs)
    _checkpointing_fit(tmp_path / "b", 3, stop_after=1, **kwargs)  # interrupted after epoch 1 of 3
    resumed, scl_b = _checkpointing_fit(tmp_path / "b", 3, ckpt_path=str(tmp_path / "b" / "last.ckpt"), **kwargs)
    assert scl_a.lam == scl_b.lam and scl_a.lam != 0.01  # the controller moved and was restored
    for name in scl_a.masks:
        assert torch.equal(scl_a.masks[name].mask, scl_b.masks[name].mask)
    for (key, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    assert len(straight.losses) == 3 * 8 and resumed.losses == straight.losses[8:]


def test_checkpoint_loads_with_weights_only(tmp_path):
    _checkpointing_fit(tmp_path, 1, lam=0.2)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if "SparseConnectivityLearning" in k]
    assert state["lam"] == 0.2 and state["mask_optimizer"]["state"]
    assert checkpoint["lightning_scl"]["scl"]["layers"] == ["net.0", "net.2", "head"]
    assert any(k.endswith("parametrizations.weight.0.mask") for k in checkpoint["state_dict"])


def test_works_with_user_lr_scheduler_onecycle():
    class WithOneCycle(MLP):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=self.trainer.max_steps)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    torch.manual_seed(0)
    scl = SparseConnectivityLearning(lam=0.2)
    fit(WithOneCycle(), [scl], max_steps=8)
    assert scl._mask_optimizer.param_groups[0]["lr"] == scl.mask_lr


def test_layer_collapse_warns_and_floor_keeps_layers_alive():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"layer '.*' has no connection left.*a skip connection bypasses it"):
        fit(MLP(), [SparseConnectivityLearning(lam=50.0, mask_lr=0.5)], max_epochs=2)
    torch.manual_seed(0)
    scl = SparseConnectivityLearning(lam=50.0, mask_lr=0.5, min_density_per_layer=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(MLP(), [scl], max_epochs=2)
    assert not [w for w in caught if "no connection left" in str(w.message)]
    for mask in scl.masks.values():
        assert mask.kept() >= 0.05 * mask.numel_connections


def test_target_density_controller_reaches_target():
    torch.manual_seed(0)
    scl = SparseConnectivityLearning(target_density=0.2, mask_lr=0.05, ramp_end=0.5)
    fit(MLP(), [scl], data=loader(n=512), max_epochs=40)
    assert abs(scl.density - 0.2) / 0.2 < 0.1, scl.density


def _simulated_density_trace(total_steps: int, seed: int) -> list[tuple[float, float]]:
    """(density, scheduled density) per step until the freeze, from the controller driving simulated masks.

    The masks behave as SCL's do: they start at 1 together, feel ``lam`` against a task gradient that differs per
    mask (plus noise), and move by SGD with momentum, so the density lags ``lam`` and then falls in a cascade.
    """
    gen = torch.Generator().manual_seed(seed)
    n = 4000
    importance = torch.empty(n).exponential_(1.0, generator=gen) * 0.3
    masks, momentum = torch.ones(n), torch.zeros(n)
    scl = SparseConnectivityLearning(target_density=0.1, report=False)
    trace = []
    for step in range(int(0.7 * total_steps)):
        density = float((masks > 0).float().mean())
        progress = step / total_steps
        trace.append((density, scl.scheduled_density(progress)))
        scl._update_lambda(density, progress, total_steps)
        grad = scl.lam - importance + 0.5 * torch.randn(n, generator=gen)
        momentum.mul_(0.9).add_(grad)
        masks.sub_(0.01 * momentum)
    return trace


@pytest.mark.parametrize("seed", [0, 1])
def test_the_controller_does_not_overshoot_in_a_run_of_a_few_hundred_steps(seed):
    # With a 50-step trend in a 300-step run, lam wound up while the masks were still on their way to the threshold
    # and the cascade took the density to 0.16-0.18x the schedule here, 0.24-0.28x in benchmarks/short_runs.py.
    trace = _simulated_density_trace(300, seed)
    lowest = min(density / scheduled for density, scheduled in trace)
    assert lowest > 0.5, lowest
    final_density = trace[-1][0]
    assert abs(final_density - 0.1) / 0.1 < 0.25, final_density


def test_the_controller_tracks_the_schedule_in_a_long_run():
    trace = _simulated_density_trace(3000, 0)
    assert min(density / scheduled for density, scheduled in trace) > 0.9
    assert abs(trace[-1][0] - 0.1) / 0.1 < 0.05, trace[-1][0]


def test_channel_granularity_trains_channel_masks():
    torch.manual_seed(0)
    scl = SparseConnectivityLearning(granularity="channel", lam=1.0, mask_lr=0.1)
    fit(MLP(), [scl], max_epochs=3)
    net0 = scl.masks["net.0"]
    assert net0.mask.shape == (32, 1)
    assert scl.density < 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lam=-1.0), "lam must be a number >= 0"),
        (dict(lam=0.1, target_density=0.1), "either lam"),
        (dict(target_density=0.0), r"target_density must be in \(0, 1\]"),
        (dict(target_density=1.5), r"target_density must be in \(0, 1\]"),
        (dict(ste="sigmoid"), "ste must be one of"),
        (dict(ste="leaky_relu", ste_slope=-0.1), "ste_slope must be > 0"),
        (dict(normalize="mean"), "normalize must be one of"),
        (dict(granularity="filter"), "granularity must be one of"),
        (dict(regularizer="params"), "regularizer must be one of"),
        (dict(mask_init=0.0), "mask_init must be > 0"),
        (dict(mask_lr=0.0), "mask_lr must be > 0"),
        (dict(mask_momentum=1.0), r"mask_momentum must be in \[0, 1\)"),
        (dict(freeze_masks_at=1.5), "freeze_masks_at must be a float fraction"),
        (dict(freeze_masks_at=0), "freeze_masks_at as an epoch number must be >= 1"),
        (dict(include=["re:("]), "not a valid regular expression"),
        (dict(layer_types=["Dense"]), "not a torch.nn layer class"),
        (dict(min_density_per_layer=1.0), r"min_density_per_layer must be in \[0, 1\)"),
        (dict(log_every_n_steps=0), "log_every_n_steps must be a positive int"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SparseConnectivityLearning(**kwargs)


def test_target_density_needs_finite_training():
    with pytest.raises(ValueError, match="finite training length"):
        fit(
            MLP(), [SparseConnectivityLearning(target_density=0.5)], max_epochs=-1, max_steps=-1, max_time="00:00:00:02"
        )


def test_training_step_loss_unchanged_by_callback():
    """The regularizer acts through gradients: the user's loss and logged values stay the task loss."""
    torch.manual_seed(0)
    model = MLP()
    fit(model, [SparseConnectivityLearning(lam=0.5)], max_steps=1)
    torch.manual_seed(0)
    fresh = MLP()
    x, y = next(iter(loader()))
    assert model.losses[0] == pytest.approx(F.cross_entropy(fresh(x), y).item(), abs=1e-6)


def test_resume_with_another_layer_selection_is_explained(tmp_path):
    _checkpointing_fit(tmp_path, 1, lam=0.2)
    with pytest.raises(ValueError, match=r"written with masks on \['net.0', 'net.2', 'head'\].*use the layer_types"):
        _checkpointing_fit(tmp_path / "b", 2, ckpt_path=str(tmp_path / "last.ckpt"), lam=0.2, exclude=["head"])


def test_resume_from_a_dense_checkpoint_is_explained(tmp_path):
    torch.manual_seed(0)
    trainer = quiet_trainer(max_epochs=1, enable_checkpointing=True, default_root_dir=tmp_path)
    trainer.fit(MLP(), loader())
    (dense_ckpt,) = tmp_path.glob("**/*.ckpt")
    with pytest.raises(ValueError, match=r"no connectivity masks.*load_from_checkpoint"):
        _checkpointing_fit(tmp_path / "b", 2, ckpt_path=str(dense_ckpt), lam=0.2)


def test_report_files_follow_the_logger_or_report_dir(tmp_path):
    torch.manual_seed(0)
    fit(MLP(), [SparseConnectivityLearning(lam=0.2)], max_steps=2, default_root_dir=tmp_path / "root")
    assert not list((tmp_path / "root").glob("scl_report*"))  # no logger: table only, no stray files
    fit(MLP(), [SparseConnectivityLearning(lam=0.2, report_dir=str(tmp_path / "rep"))], max_steps=2)
    assert {p.name for p in (tmp_path / "rep").iterdir()} >= {"scl_report.csv", "scl_report.json"}


class SnapSpy(SparseConnectivityLearning):
    """Records the mask values the exact-density snap starts from."""

    def _snap_to_target_density(self):
        self.before_snap = masks_of(self)
        super()._snap_to_target_density()


@pytest.mark.parametrize("exact_density", [True, False])
def test_exact_density_at_the_freeze_keeps_the_largest_masks(exact_density):
    torch.manual_seed(0)
    scl = SnapSpy(target_density=0.23, mask_lr=0.05, ramp_end=0.4, freeze_masks_at=0.6, exact_density=exact_density)
    fit(MLP(), [scl], data=loader(n=512), max_epochs=10)
    total = sum(m.numel_connections for m in scl.masks.values())
    kept = sum(m.kept() for m in scl.masks.values())
    assert scl.frozen
    if not exact_density:
        assert not hasattr(scl, "before_snap")  # the freeze left the controller's density as it was
        assert abs(kept / total - 0.23) < 0.05
        return
    assert kept == round(0.23 * total)
    before = torch.cat([v.reshape(-1) for v in scl.before_snap.values()])
    after = torch.cat([m.mask.detach().reshape(-1) for m in scl.masks.values()])
    assert int((before > 0).sum()) != kept  # the snap had something to do
    # one ranking over all layers: nothing dropped ranks above anything kept
    assert before[after > 0].min() >= before[after <= 0].max()


def _masks_with_values(scl: SparseConnectivityLearning, values: dict[str, torch.Tensor], granularity="weight"):
    from lightning_scl.masking import ConnectivityMask

    for name, value in values.items():
        shape = value.shape if granularity == "weight" else (value.numel(), 5)
        mask = ConnectivityMask(shape, granularity=granularity)
        mask.mask.data = value.reshape(mask.mask.shape).clone()
        scl._masks[name] = mask


def test_exact_density_snap_ranks_across_layers_and_respects_layer_floors():
    scl = SparseConnectivityLearning(target_density=0.5, min_density_per_layer=0.25)
    # the goal is 4 of 8: the four largest are all in layer "a", but the floor keeps one of "b" (its largest)
    _masks_with_values(
        scl, {"a": torch.tensor([[0.9, 0.8], [0.7, -0.1]]), "b": torch.tensor([[-0.5, -0.2], [-0.3, -0.4]])}
    )
    scl._snap_to_target_density()
    assert (scl.masks["a"].mask > 0).tolist() == [[True, True], [True, False]]
    assert (scl.masks["b"].mask > 0).tolist() == [[False, True], [False, False]]
    # unchanged values where nothing changed; revived ones just above the threshold
    assert float(scl.masks["a"].mask[0, 0]) == pytest.approx(0.9) and 0 < float(scl.masks["b"].mask[0, 1]) < 0.01


def test_exact_density_snap_with_channel_masks_takes_the_nearest_count():
    # channel masks of 5 connections each; 40 connections, goal round(0.3 * 40) = 12: 10 (2 channels) is nearer than
    # 15 (3 channels), and the two kept are the two largest
    scl = SparseConnectivityLearning(target_density=0.3, granularity="channel")
    _masks_with_values(
        scl, {"a": torch.tensor([0.5, -0.2, 0.1, 0.3]), "b": torch.tensor([0.2, -0.1, 0.05, 0.4])}, "channel"
    )
    scl._snap_to_target_density()
    kept = {name: (m.mask.view(-1) > 0).tolist() for name, m in scl.masks.items()}
    assert kept == {"a": [True, False, False, False], "b": [False, False, False, True]}
    assert scl.density == pytest.approx(10 / 40)


def test_exact_density_warns_when_the_controller_was_far_from_the_target():
    # five steps: the masks freeze long before the controller could prune to 10%
    scl = SparseConnectivityLearning(target_density=0.1, ramp_end=0.3, freeze_masks_at=0.5)
    with pytest.warns(UserWarning, match="far from target_density=0.1"):
        fit(MLP(), [scl], max_steps=5)
    total = sum(m.numel_connections for m in scl.masks.values())
    assert sum(m.kept() for m in scl.masks.values()) == round(0.1 * total)


def test_exact_density_snap_keeps_layer_floors_above_the_target():
    # goal round(0.1 * 8) = 1 connection, but the floors ask for 2 of the 4 variables in each layer: all 4 stay
    scl = SparseConnectivityLearning(target_density=0.1, min_density_per_layer=0.5)
    _masks_with_values(
        scl, {"a": torch.tensor([[0.9, 0.8], [-0.7, -0.1]]), "b": torch.tensor([[-0.5, -0.2], [-0.3, 0.4]])}
    )
    scl._snap_to_target_density()
    assert (scl.masks["a"].mask > 0).tolist() == [[True, True], [False, False]]
    assert (scl.masks["b"].mask > 0).tolist() == [[False, True], [False, True]]


class _KeptLog(L.Callback):
    """The connections the controller saw at each step (what the batched path counts on the host)."""

    def __init__(self, scl: SparseConnectivityLearning):
        self.scl, self.counts = scl, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counts.append(sum(mask.kept() for mask in self.scl.masks.values()))


@pytest.mark.parametrize(
    "options",
    [
        dict(target_density=0.3, freeze_masks_at=None),  # the defaults: network-wide mean |g|, identity STE
        dict(target_density=0.3, freeze_masks_at=None, normalize_over="layer", normalize="l2"),
        dict(lam=0.3, normalize="max_abs", mask_init=0.05),
        dict(lam=0.3, normalize="none", mask_init=0.02),
        dict(lam=0.3, granularity="channel", mask_lr=0.05),
    ],
)
def test_the_batched_mask_step_trains_as_the_per_layer_one(options):
    """On a GPU the mask step runs as a few multi-tensor kernels; here it is forced on the CPU and compared."""
    runs = {}
    for batched in (False, True):
        torch.manual_seed(0)
        model = MLP(weight_decay=1e-2)  # weight decay: the protected-weight snapshot and restore run too
        scl = SparseConnectivityLearning(log_every_n_steps=1, **options)
        scl._force_batched_step = batched
        kept = _KeptLog(scl)
        quiet_trainer(callbacks=[scl, kept], max_steps=12).fit(model, loader())
        assert scl._batched_step == batched
        runs[batched] = (model, scl, kept)
    (model_a, scl_a, kept_a), (model_b, scl_b, kept_b) = runs[False], runs[True]
    # float rounding differs (a norm kernel vs abs().sum(), host vs device reciprocals): close, not bit-equal
    for name, mask in scl_a.masks.items():
        torch.testing.assert_close(scl_b.masks[name].mask, mask.mask, rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert scl_b.lam == pytest.approx(scl_a.lam, rel=1e-3)
    assert kept_b.counts == kept_a.counts and scl_b.density == scl_a.density < 1.0
    # the host-side counts that steered the controller are exact: they match a fresh count of the final masks
    stats, counts = scl_b._batched_statistics_and_counts(
        [_with_grad(m) for m in scl_b.masks.values()], "mean_abs", count=True
    )
    assert {name: int(c) for name, c in counts.items()} == {name: m.kept() for name, m in scl_b.masks.items()}
    assert stats == pytest.approx([1.0] * len(stats))  # the mean |g| of all-ones gradients, per layer or overall


def _with_grad(mask: ConnectivityMask) -> ConnectivityMask:
    mask.mask.grad = torch.ones_like(mask.mask)
    return mask


class _FreezeStep(Callback):
    """The optimizer step at which the masks froze, and the density before every step."""

    def __init__(self, scl: SparseConnectivityLearning) -> None:
        self.scl, self.frozen_at, self.density_before = scl, None, {0: 1.0}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.density_before[trainer.global_step] = self.scl.density
        if self.scl.frozen and self.frozen_at is None:
            self.frozen_at = trainer.global_step - 1


def test_accumulation_schedule_changes_neither_the_ramp_nor_the_freeze_point():
    # 8 batches per epoch, accumulating 1 then 4 from epoch 2: 2 * 8 + 6 * 2 = 28 optimizer steps. Lightning's
    # estimated_stepping_batches drops from 64 to 16 at epoch 2, which made the schedule jump to its end.
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    torch.manual_seed(0)
    scl = SparseConnectivityLearning(target_density=0.2, freeze_masks_at=0.8)
    spy = _FreezeStep(scl)
    trainer = fit(MLP(), [scl, spy, GradientAccumulationScheduler({0: 1, 2: 4})], max_epochs=8)
    assert trainer.global_step == 28
    assert scl._total_optimizer_steps(trainer) == 28
    assert spy.frozen_at == math.ceil(0.8 * 28)  # the first step with progress >= 0.8
    assert scl.density == pytest.approx(0.2, abs=0.01)


def _logged_density(logger: CSVLogger) -> dict[int, float]:
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        return {int(r["step"]): float(r["scl/density"]) for r in csv.DictReader(fh) if r.get("scl/density")}


@pytest.mark.parametrize("period, epochs, accumulate", [(5, 5, 1), (50, 20, 1), (5, 10, 2)])
def test_logged_density_is_the_density_of_the_step_it_is_written_at(tmp_path, period, epochs, accumulate):
    # The logger writes on the Trainer's logging steps; metrics logged on other steps came late (stale) or, with
    # epochs shorter than the period, never.
    torch.manual_seed(0)
    scl = SparseConnectivityLearning(lam=0.2)
    spy = _FreezeStep(scl)
    logger = CSVLogger(tmp_path, name="run")
    trainer = fit(
        MLP(),
        [scl, spy],
        max_epochs=epochs,
        logger=logger,
        log_every_n_steps=period,
        accumulate_grad_batches=accumulate,
    )
    logged = _logged_density(logger)
    assert sorted(logged) == list(range(period - 1, trainer.global_step, period))
    for step, density in logged.items():
        assert density == pytest.approx(spy.density_before[step], abs=1e-6), step


def test_a_callback_logging_period_off_the_trainers_is_named_in_a_warning(tmp_path):
    scl = SparseConnectivityLearning(lam=0.1, log_every_n_steps=3)
    with pytest.warns(UserWarning, match=r"log_every_n_steps=3\) is not a multiple of Trainer\(log_every_n_steps=5\)"):
        fit(MLP(), [scl], max_steps=2, log_every_n_steps=5)


def test_training_that_ends_before_the_freeze_epoch_says_so():
    scl = SparseConnectivityLearning(target_density=0.2, freeze_masks_at=8)
    with pytest.warns(UserWarning, match=r"training ended \(step 40, epoch 5\) before the masks froze"):
        trainer = fit(MLP(), [scl], max_epochs=10, max_steps=40)
    assert not scl.frozen and trainer.global_step == 40


def test_a_freeze_fraction_past_the_last_step_is_named_as_such():
    scl = SparseConnectivityLearning(target_density=0.5, ramp_end=0.5, freeze_masks_at=0.95)
    with pytest.warns(UserWarning, match="lies past the last of this run's 8 optimizer steps"):
        fit(MLP(), [scl], max_steps=8)
