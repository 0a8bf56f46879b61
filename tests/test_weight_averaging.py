"""SparseConnectivityLearning with Lightning's weight averaging callbacks (EMA, SWA): the average is of the weights,
under the masks training learned; an average of mask variables would be a connectivity nobody trained."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint, StochasticWeightAveraging

from lightning_scl.callbacks.scl import SparseConnectivityLearning
from lightning_scl.masking import count_connections, fold_state_dict
from tests.conftest import MLP, loader, quiet_trainer


class RecordMasksAtTrainEnd(SparseConnectivityLearning):
    """Keeps the masks as training left them, before the averaging callbacks write their average into the model."""

    def on_train_end(self, trainer, pl_module):
        self.trained_masks = {name: mask.mask.detach().clone() for name, mask in self.masks.items()}
        super().on_train_end(trainer, pl_module)


class MLPWithModuleAttribute(MLP):
    """An attribute named ``module``, as AveragedModel's wrapped copy is: SWA's average is the model itself."""

    def __init__(self):
        super().__init__()
        self.module = torch.nn.Identity()


class SeenByValidation(RecordMasksAtTrainEnd):
    def on_validation_epoch_start(self, trainer, pl_module):
        super().on_validation_epoch_start(trainer, pl_module)
        self.validated = getattr(self, "validated", 0) + 1


@pytest.mark.parametrize(
    "averaging, model_class",
    [
        (lambda: EMAWeightAveraging(), MLP),
        (lambda: StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2), MLP),
        (lambda: StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2), MLPWithModuleAttribute),
    ],
    ids=["ema", "swa", "swa-model-with-a-module-attribute"],
)
def test_averaging_keeps_the_trained_masks_and_the_target_density(averaging, model_class, tmp_path):
    torch.manual_seed(0)
    model = model_class()
    scl = SeenByValidation(target_density=0.2, mask_lr=0.1, report=False)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(max_epochs=12, callbacks=[scl, averaging(), checkpoints], enable_checkpointing=True)
    trainer.fit(model, loader(), val_dataloaders=loader(n=64))  # EMA validates with its average swapped in
    assert scl.validated >= 12
    final = {name: m.mask.detach().clone() for name, m in scl.masks.items()}
    for name, mask in scl.masks.items():  # the average changed the weights but not the masks
        assert torch.equal(mask.mask.detach(), scl.trained_masks[name]), name
    kept, total = count_connections(model)
    by_value = sum(int((m > 0).sum()) for m in final.values())
    assert kept == by_value and kept / total == pytest.approx(0.2, abs=0.002) and scl.density == kept / total
    model.eval()
    x = torch.randn(16, 16)
    plain = model_class()
    plain.load_state_dict(fold_state_dict(model.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), model(x))  # the export computes what the model does
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in saved.items():  # EMA saves its average as the state_dict: with the trained masks
        if key.endswith(".mask"):
            assert torch.equal(value, final[key.removesuffix(".parametrizations.weight.0.mask")]), key


def test_an_averaging_callback_listed_first_is_an_error_saying_to_list_scl_first():
    trainer = quiet_trainer(max_steps=1, callbacks=[EMAWeightAveraging(), SparseConnectivityLearning(report=False)])
    with pytest.raises(ValueError, match=r"EMAWeightAveraging comes before SparseConnectivityLearning.*first"):
        trainer.fit(MLP(), loader())
