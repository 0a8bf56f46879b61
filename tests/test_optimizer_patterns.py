"""SparseConnectivityLearning under optimization patterns beyond one optimizer step per batch: GANs (manual
optimization, two optimizers), closure optimizers (LBFGS), true half precision, reused callbacks and resumed runs."""

from __future__ import annotations

import logging

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_scl.callbacks.scl import SparseConnectivityLearning
from tests.conftest import GAN, MLP, gan_data, loader, quiet_trainer


class StepSpy(SparseConnectivityLearning):
    """Records, at every mask optimizer step, which masks carry a gradient."""

    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        self.stepped: list[set[str]] = []
        step = self._mask_optimizer.step

        def spy(*args, **kwargs):
            self.stepped.append({name for name, m in self.masks.items() if m.mask.grad is not None})
            return step(*args, **kwargs)

        self._mask_optimizer.step = spy


def test_each_optimizer_of_a_gan_steps_the_masks_of_its_own_weights():
    torch.manual_seed(0)
    scl = StepSpy(lam=0.0, freeze_masks_at=None, report=False)
    quiet_trainer(max_steps=4, callbacks=[scl]).fit(GAN(), gan_data())
    # the generator's step trains G's mask only: D's gradient there came from the generator's loss while D's
    # weights were frozen by toggle_optimizer, so it is dropped, not applied to D by D's step
    assert scl.stepped == [{"G.0"}, {"D.0"}, {"G.0"}, {"D.0"}]


def test_masks_under_one_of_several_optimizers_step_only_with_it():
    torch.manual_seed(0)
    scl = StepSpy(lam=0.0, freeze_masks_at=None, include=["D.*"], report=False)
    quiet_trainer(max_steps=4, callbacks=[scl]).fit(GAN(), gan_data())
    # only the discriminator is masked, and only the discriminator's steps train its mask: the generator's loss
    # reached it while toggle_optimizer had frozen D's weights
    assert scl.stepped == [{"D.0"}, {"D.0"}]


class LateDiscriminatorLayer(GAN):
    """D's first layer joins D's optimizer only at epoch 1 (add_param_group), as BackboneFinetuning does."""

    def __init__(self):
        super().__init__()
        self.D = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 1))
        self.D[0].requires_grad_(False)

    def configure_optimizers(self):
        return [torch.optim.SGD(self.G.parameters(), lr=0.01), torch.optim.SGD(self.D[1].parameters(), lr=0.01)]


class UnfreezeD0(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            pl_module.D[0].requires_grad_(True)
            trainer.optimizers[1].add_param_group({"params": list(pl_module.D[0].parameters())})


def test_ownership_follows_param_groups_added_during_fit():
    torch.manual_seed(0)
    scl = StepSpy(lam=0.0, freeze_masks_at=None, include=["D.*"], report=False)
    quiet_trainer(max_epochs=2, callbacks=[scl, UnfreezeD0()]).fit(LateDiscriminatorLayer(), gan_data())
    # epoch 0: D.0 is held by no optimizer (one step per batch); epoch 1: it steps with D's optimizer only,
    # never on the generator's loss
    assert scl.stepped[-2:] == [{"D.0", "D.1"}, {"D.0", "D.1"}]
    assert all(stepped <= {"D.0", "D.1"} for stepped in scl.stepped)


class GANWithSharedFixedLayer(GAN):
    """A layer both losses pass through whose weight no optimizer holds (only its mask learns)."""

    def __init__(self):
        super().__init__()
        self.E = nn.Sequential(nn.Linear(8, 8))

    def critic(self, x):
        return self.D(self.E(x))


def test_masks_of_weights_no_optimizer_holds_step_once_per_batch():
    torch.manual_seed(0)
    scl = StepSpy(lam=0.0, freeze_masks_at=None, report=False)
    quiet_trainer(max_steps=6, callbacks=[scl]).fit(GANWithSharedFixedLayer(), gan_data(n=24))
    # E's mask steps at the first optimizer step of each batch, with the gradients of every loss since its last step
    assert scl.stepped == [{"G.0", "E.0"}, {"D.0"}] * 3


class SwitchOffHalf(Callback):
    """Switches off the first half of every masked layer's columns before training."""

    def on_train_start(self, trainer, pl_module):
        scl = next(c for c in trainer.callbacks if isinstance(c, SparseConnectivityLearning))
        with torch.no_grad():
            for mask in scl.masks.values():
                mask.mask[:, : mask.mask.shape[1] // 2] = -1.0


def test_pruned_weights_of_both_gan_networks_keep_their_values_under_weight_decay():
    torch.manual_seed(0)
    model = GAN(weight_decay=0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("weight")}
    scl = SparseConnectivityLearning(lam=0.0, mask_lr=1e-9, freeze_masks_at=None, report=False)
    quiet_trainer(max_steps=6, callbacks=[scl, SwitchOffHalf()]).fit(model, gan_data())
    for name in ("G.0", "D.0"):
        original = getattr(model, name[0])[0].parametrizations.weight.original.detach()
        half = original.shape[1] // 2
        key = f"{name[0]}.0.weight"
        assert torch.equal(original[:, :half], before[key][:, :half]), name  # decay never touched them
        assert not torch.equal(original[:, half:], before[key][:, half:]), name  # the kept ones trained


class BackboneAndHead(MLP):
    """BackboneFinetuning's recipe: the optimizer starts with the head; the backbone's group is added at unfreeze."""

    def __init__(self):
        super().__init__(weight_decay=0.5)
        self.backbone = self.net

    def forward(self, x):
        return self.head(self.backbone(x))

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(trainable, lr=0.1, weight_decay=self.hparams.weight_decay)


def test_pruned_weights_of_a_param_group_added_during_fit_are_protected_from_weight_decay():
    from lightning.pytorch.callbacks import BackboneFinetuning

    torch.manual_seed(0)
    model = BackboneAndHead()
    before = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("weight")}
    scl = SparseConnectivityLearning(lam=0.0, mask_lr=1e-9, freeze_masks_at=None, report=False)
    unfreeze = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=1.0)
    quiet_trainer(max_epochs=3, callbacks=[scl, SwitchOffHalf(), unfreeze]).fit(model, loader())
    for name in ("backbone.0", "backbone.2"):
        original = model.get_submodule(name).parametrizations.weight.original.detach()
        half = original.shape[1] // 2
        initial = before[f"net.{name[-1]}.weight"]
        assert torch.equal(original[:, :half], initial[:, :half]), name  # decay never touched the pruned ones
        assert not torch.equal(original[:, half:], initial[:, half:]), name  # the kept ones trained after unfreeze


def test_progress_counts_batches_under_manual_optimization_with_two_optimizers():
    torch.manual_seed(0)
    seen: list[tuple[int, bool]] = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((batch_idx, scl.frozen))

    scl = SparseConnectivityLearning(lam=0.1, freeze_masks_at=0.7, report=False)
    quiet_trainer(max_epochs=1, callbacks=[scl, Spy()]).fit(GAN(), gan_data(n=80, batch_size=8))
    # 10 batches, 20 optimizer steps: the freeze comes at 70% of the batches, not of 10 "stepping batches"
    first_frozen = next(i for i, frozen in seen if frozen)
    assert first_frozen == 7


class LBFGSModel(MLP):
    def configure_optimizers(self):
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=5)


def test_a_closure_optimizer_gets_one_mask_step_per_optimizer_step():
    torch.manual_seed(0)
    scl = StepSpy(lam=0.0, freeze_masks_at=None, report=False)
    trainer = quiet_trainer(max_steps=3, callbacks=[scl])
    trainer.fit(LBFGSModel(), loader())
    assert len(scl.stepped) == 3  # LBFGS ran its closure (and the hook) up to 5 times per step
    mask_ids = {id(m.mask) for m in scl.masks.values()}
    assert not any(id(p) in mask_ids for p in trainer.optimizers[0]._params)  # LBFGS's own list, not a copy


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_true_half_precision_keeps_masks_float32_so_small_updates_land(precision):
    torch.manual_seed(0)

    class ZeroLoss(MLP):
        def training_step(self, batch, batch_idx):
            return (self(batch[0].to(self.dtype)) * 0.0).sum()

    # zero task loss: each step moves every mask by exactly mask_lr * lam, below bfloat16's resolution at 2.0
    scl = SparseConnectivityLearning(
        lam=0.3, mask_lr=0.01, mask_momentum=0.0, mask_init=2.0, freeze_masks_at=None, report=False
    )
    quiet_trainer(max_steps=10, precision=precision, callbacks=[scl], deterministic=False).fit(ZeroLoss(), loader())
    for mask in scl.masks.values():
        assert mask.mask.dtype == torch.float32
        assert torch.allclose(mask.mask.detach(), torch.full_like(mask.mask, 2.0 - 10 * 0.003), atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_resuming_in_true_half_precision_continues_from_the_float32_masks(precision, tmp_path):
    seen = {}

    class FirstBatch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not seen:
                seen.update({k: v.detach().clone() for k, v in pl_module.named_parameters() if k.endswith(".mask")})

    def run(ckpt_path=None):
        torch.manual_seed(0)
        scl = SparseConnectivityLearning(lam=0.3, mask_lr=0.05, mask_init=0.1, freeze_masks_at=None, report=False)
        callbacks = [scl, FirstBatch(), ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)]
        trainer = quiet_trainer(max_epochs=2, precision=precision, callbacks=callbacks, enable_checkpointing=True)
        trainer.fit(MLP(), loader(), ckpt_path=ckpt_path)

    run()
    (first_epoch,) = tmp_path.glob("epoch=0-*.ckpt")
    saved = torch.load(first_epoch, weights_only=True)["state_dict"]
    seen.clear()
    run(ckpt_path=first_epoch)
    assert len(seen) == 3  # the resumed fit ran a batch, with all three masks
    for key, value in seen.items():
        assert value.dtype == torch.float32 and torch.equal(value, saved[key]), key  # not their half rounding


def test_a_callback_reused_for_a_new_fit_trains_its_masks_again():
    torch.manual_seed(0)
    scl = SparseConnectivityLearning(lam=0.1, freeze_masks_at=0.5, report=False)
    quiet_trainer(max_steps=4, callbacks=[scl]).fit(MLP(), loader())
    assert scl.frozen
    model = MLP()
    quiet_trainer(max_steps=4, callbacks=[scl]).fit(model, loader())
    assert scl.frozen  # froze again at 50%, after training: it did not start frozen
    moved = [not torch.all(m.mask.detach() == 1.0) for m in scl.masks.values()]
    assert all(moved)


def test_masks_already_on_the_model_are_continued_and_announced(caplog):
    torch.manual_seed(0)
    model = MLP()
    first = SparseConnectivityLearning(lam=0.3, freeze_masks_at=None, report=False)
    quiet_trainer(max_steps=6, callbacks=[first]).fit(model, loader())
    trained = {name: m.mask.detach().clone() for name, m in first.masks.items()}
    second = SparseConnectivityLearning(lam=0.0, mask_init=3.0, freeze_masks_at=None, report=False)
    with caplog.at_level(logging.INFO):
        quiet_trainer(max_steps=1, callbacks=[second]).fit(model, loader())
    message = " ".join(r.getMessage() for r in caplog.records if "SparseConnectivityLearning:" in r.getMessage())
    assert f"{len(trained)} of the masks were already on the model" in message and "mask_init=3" in message
    for name, mask in second.masks.items():  # continued from the trained values (one step on), not 3.0
        assert (mask.mask.detach() - trained[name]).abs().mean() < 0.05
    for scl in (SparseConnectivityLearning(report=False), second):  # a new callback, and one used before
        caplog.clear()
        with caplog.at_level(logging.INFO):  # a model without masks: nothing carried over, nothing announced
            quiet_trainer(max_steps=1, callbacks=[scl]).fit(MLP(), loader())
        assert not any("already on the model" in r.getMessage() for r in caplog.records)


def test_resuming_with_a_callback_an_earlier_fit_used_restores_its_mask_momentum(tmp_path):
    def fit(scl, ckpt_path=None, save=False):
        torch.manual_seed(0)
        model = MLP(weight_decay=1e-3)
        callbacks = [scl] + ([ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)] if save else [])
        trainer = quiet_trainer(max_epochs=3, callbacks=callbacks, enable_checkpointing=save)
        trainer.fit(model, loader(), ckpt_path=ckpt_path)
        return model

    settings = dict(target_density=0.3, mask_lr=0.1, freeze_masks_at=0.8, report=False)
    first = SparseConnectivityLearning(**settings)
    uninterrupted = fit(first, save=True)
    (after_one_epoch,) = tmp_path.glob("epoch=0-*.ckpt")
    resumed = fit(first, ckpt_path=after_one_epoch)  # the same callback object, whose old mask optimizer is gone
    for key, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_resuming_after_a_fit_that_raised_restores_the_mask_momentum(tmp_path):
    class Crash(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise RuntimeError("simulated crash")

    seen: list[int] = []

    class MomentumAtFirstBatch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not seen:
                seen.append(len(scl._mask_optimizer.state_dict()["state"]))

    torch.manual_seed(0)
    scl = SparseConnectivityLearning(target_density=0.3, mask_lr=0.1, freeze_masks_at=None, report=False)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated crash"):  # Lightning skips teardown after an exception
        quiet_trainer(max_epochs=3, callbacks=[scl, Crash(), checkpoints], enable_checkpointing=True).fit(
            MLP(), loader()
        )
    (after_one_epoch,) = tmp_path.glob("epoch=0-*.ckpt")
    quiet_trainer(max_epochs=2, callbacks=[scl, MomentumAtFirstBatch()]).fit(MLP(), loader(), ckpt_path=after_one_epoch)
    assert seen == [3]  # one momentum buffer per mask, from the checkpoint


def test_masks_made_with_another_estimator_are_an_error():
    model = MLP()
    quiet_trainer(max_steps=1, callbacks=[SparseConnectivityLearning(lam=0.1, report=False)]).fit(model, loader())
    trainer = quiet_trainer(max_steps=1, callbacks=[SparseConnectivityLearning(ste="softplus", report=False)])
    with pytest.raises(ValueError, match=r"ste='identity'.*ste='softplus'"):
        trainer.fit(model, loader())


def test_resuming_keeps_a_fixed_lam_from_the_constructor(tmp_path):
    torch.manual_seed(0)
    trainer = quiet_trainer(max_epochs=1, callbacks=[SparseConnectivityLearning(lam=0.1, report=False)])
    trainer.fit(MLP(), loader())
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    scl = SparseConnectivityLearning(lam=2.0, freeze_masks_at=None, report=False)
    quiet_trainer(max_epochs=2, callbacks=[scl]).fit(MLP(), loader(), ckpt_path=tmp_path / "run.ckpt")
    assert scl.lam == 2.0  # as mask_lr: a fixed setting is the constructor's, only the controller's lam is state


def test_an_epoch_freeze_before_the_density_ramp_ends_is_an_error():
    scl = SparseConnectivityLearning(target_density=0.1, freeze_masks_at=1, ramp_end=0.5, report=False)
    with pytest.raises(ValueError, match=r"freeze_masks_at=1 \(epoch\) of max_epochs=4.*e\.g\. 3"):
        quiet_trainer(max_epochs=4, callbacks=[scl]).fit(MLP(), loader())


class LazyMLP(MLP):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.LazyLinear(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())


def test_lazy_layers_are_materialized_from_the_example_input_and_masked():
    model = LazyMLP()
    scl = SparseConnectivityLearning(lam=0.1, report=False)
    quiet_trainer(max_steps=2, callbacks=[scl]).fit(model, loader())
    assert "net.0" in scl.masks and scl.masks["net.0"].mask.shape == (32, 16)
    fresh = LazyMLP()
    fresh.example_input_array = None
    with pytest.raises(ValueError, match=r"uninitialized \(lazy\) weight.*example_input_array"):
        quiet_trainer(max_steps=1, callbacks=[SparseConnectivityLearning(report=False)]).fit(fresh, loader())


@pytest.mark.parametrize(("value", "expected"), [("5", 5), ("0.7", 0.7)])
def test_freeze_masks_at_from_the_command_line_keeps_its_type(value, expected, tmp_path):
    from lightning_scl.cli import run_lightning_cli

    cli = run_lightning_cli(
        [
            "--data=lightning_scl.data.MNISTDataModule",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks=lightning_scl.SparseConnectivityLearning",
            f"--trainer.callbacks.init_args.freeze_masks_at={value}",
        ],
        run=False,
    )
    scl = next(c for c in cli.trainer.callbacks if isinstance(c, SparseConnectivityLearning))
    assert scl.freeze_masks_at == expected and type(scl.freeze_masks_at) is type(expected)


def test_with_one_optimizer_every_mask_steps_at_every_step():
    """One optimizer (the common case): the mask step sees every mask, as before the multi-optimizer support."""
    torch.manual_seed(0)
    scl = StepSpy(lam=0.1, freeze_masks_at=None, report=False)
    quiet_trainer(max_steps=3, callbacks=[scl]).fit(MLP(), loader())
    assert scl.stepped == [set(scl.masks)] * 3


def test_the_density_controller_updates_once_per_batch_with_two_optimizers():
    torch.manual_seed(0)
    calls: list[int] = []

    class Counting(SparseConnectivityLearning):
        def _update_lambda(self, *args):
            calls.append(1)
            super()._update_lambda(*args)

    scl = Counting(target_density=0.5, freeze_masks_at=None, report=False)
    quiet_trainer(max_epochs=1, callbacks=[scl]).fit(GAN(), gan_data(n=32, batch_size=8))
    assert len(calls) == 4  # 4 batches, 8 optimizer steps
