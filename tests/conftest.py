"""Shared small models and trainer settings for the tests."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
import warnings

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(min(2, os.cpu_count() or 1))
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


@functools.cache
def _trainer_root() -> str:
    """One folder for every trainer's end-of-fit reports (they must not land in the repo), removed at exit.

    A folder per trainer used to be left behind, thousands per run; created on first use so that helper scripts
    importing this module (some are killed on purpose) leave nothing either.
    """
    root = tempfile.mkdtemp(prefix="scl_tests_")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU trainer with no logger, checkpoint, progress bar or summary unless asked for."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=tempfile.mkdtemp(dir=_trainer_root()),
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def blobs(n: int = 256, dim: int = 16, classes: int = 4, seed: int = 0) -> TensorDataset:
    """A learnable toy classification set: Gaussian blobs around fixed class centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + torch.randn(n, dim, generator=g)
    return TensorDataset(x, y)


def loader(batch_size: int = 32, n: int = 256, shuffle: bool = False, **kwargs) -> DataLoader:
    return DataLoader(blobs(n=n, **kwargs), batch_size=batch_size, shuffle=shuffle)


class MLP(L.LightningModule):
    """A small classifier whose optimizer is the user's: SGD over ``self.parameters()`` with weight decay."""

    def __init__(self, dim: int = 16, hidden: int = 32, classes: int = 4, lr: float = 0.1, weight_decay: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)
        self.losses: list[float] = []
        self.example_input_array = torch.zeros(1, dim)

    def forward(self, x):
        return self.head(self.net(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay
        )


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: about as fast for small runs, and far faster when other processes keep the cores busy
    (two threads contending with them spin and wait)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP()


class GAN(L.LightningModule):
    """Lightning's documented two-optimizer recipe: toggle_optimizer freezes the other network's weights."""

    def __init__(self, weight_decay: float = 0.0):
        super().__init__()
        self.automatic_optimization = False
        self.weight_decay = weight_decay
        self.G = nn.Sequential(nn.Linear(4, 8))
        self.D = nn.Sequential(nn.Linear(8, 1))

    def critic(self, x):
        """The discriminator's score; subclasses put layers in front of it."""
        return self.D(x)

    def training_step(self, batch, batch_idx):
        x = batch[0]
        opt_g, opt_d = self.optimizers()
        z = torch.randn(x.shape[0], 4)
        self.toggle_optimizer(opt_g)
        self.manual_backward(-self.critic(self.G(z)).mean())
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)
        self.toggle_optimizer(opt_d)
        self.manual_backward(self.critic(self.G(z).detach()).mean() - self.critic(x).mean())
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.G.parameters(), lr=0.01, weight_decay=self.weight_decay),
            torch.optim.SGD(self.D.parameters(), lr=0.01, weight_decay=self.weight_decay),
        ]


def gan_data(n: int = 16, batch_size: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 8, generator=torch.Generator().manual_seed(0))), batch_size)
