"""``benchmarks/mnist_pruning.py --retrain-epochs``: the pruned connections stay pruned while the rest train on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_scl import SparseConnectivityLearning
from lightning_scl.masking import count_connections
from lightning_scl.models import ImageClassifier

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "mnist_pruning.py"


def load_script():
    spec = importlib.util.spec_from_file_location("mnist_pruning_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RandomDigits(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(256, 1, 28, 28, generator=generator), torch.randint(0, 10, (256,)))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=32, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=64)


# 32 steps are too few for the controller to reach 10% before the freeze; the exact-density step gets it there.
@pytest.mark.filterwarnings("ignore:.*exact-density step")
def test_retrain_keeps_pruned_weights_at_zero_and_trains_the_rest():
    script = load_script()
    torch.manual_seed(0)
    model = ImageClassifier("lenet300", lr=0.05)
    scl = SparseConnectivityLearning(target_density=0.1)
    data = RandomDigits()
    trainer = L.Trainer(
        max_epochs=4, callbacks=[scl], logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(model, data)
    kept, total = count_connections(model)
    before = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, nn.Linear)}

    sparse, second = script.retrain(model, data, epochs=2)

    assert second.current_epoch == 2  # a fresh schedule of its own: the second trainer ran its 2 epochs
    after = {name: m.weight for name, m in sparse.named_modules() if isinstance(m, nn.Linear)}
    assert sum(int((w != 0).sum()) for w in after.values()) == kept
    assert sum(w.numel() for w in after.values()) == total
    for name, weight in after.items():
        assert torch.equal(weight == 0, before[name] == 0), name  # the same connections, none regrown
        assert not torch.allclose(weight, before[name]), name  # and the kept ones trained on
        assert type(sparse.get_submodule(name)) is nn.Linear  # no pruning hooks or masks left behind
    # The SCL model itself is untouched: still masked, same effective weights.
    for name, module in model.named_modules():
        if name in before:
            assert torch.equal(module.weight, before[name])
    assert count_connections(model) == (kept, total)
