"""Every recipe in examples/recipes parses and runs one batch (``--trainer.fast_dev_run=true``) through the CLI.

MNIST and Fashion-MNIST recipes run on their real data (a small ``train_subset``); the CIFAR and ImageNet recipes run
on the data modules' synthetic mode (torchvision FakeData), since those data sets are not available offline.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lightning_scl.callbacks.scl import SparseConnectivityLearning
from lightning_scl.cli import run_lightning_cli

RECIPES_DIR = Path(__file__).resolve().parents[1] / "examples" / "recipes"
REQUIRED = {
    "mnist_lenet300_scl",
    "mnist_lenet5_scl",
    "fashion_cnn_scl_elu",
    "cifar10_resnet56_scl",
    "cifar10_vgg16_scl",
    "cifar100_elu",
    "imagenet_resnet50_scl",
}
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))

# small, fast data for one batch; the synthetic modes are FakeData and say so in their logs
SYNTHETIC_CIFAR = ["--data.synthetic=true", "--data.synthetic_size=32", "--data.batch_size=4", "--data.num_workers=0"]
SYNTHETIC_IMAGENET = [
    "--data.synthetic=true",
    "--data.synthetic_size=8",
    "--data.image_size=32",
    "--data.batch_size=2",
    "--data.num_workers=0",
]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST-format data shared by test_cli.py and this file (same folder, fetched once per session)."""
    shared = os.environ.get("LIGHTNING_SCL_DATA")
    return Path(shared) if shared else tmp_path_factory.getbasetemp() / "lightning_scl_data"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def data_overrides(text: str, data_dir: Path) -> list[str]:
    if "MNISTDataModule" in text:  # MNIST and Fashion-MNIST: real data, a small subset
        return [f"--data.data_dir={data_dir}", "--data.train_subset=64", "--data.batch_size=8"]
    if "CIFAR10DataModule" in text or "CIFAR100DataModule" in text:
        return SYNTHETIC_CIFAR
    if "ImageNetDataModule" in text:
        return SYNTHETIC_IMAGENET
    raise AssertionError("recipe uses a data module this test does not know: add its fast overrides here")


def test_required_recipes_exist() -> None:
    assert {p.stem for p in RECIPES} >= REQUIRED


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_header(recipe: Path) -> None:
    """Each recipe starts with a comment header: what it reproduces, expected result, run time, how to run it."""
    header = []
    for line in recipe.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    for label in ("Reproduces", "Expected result:", "Run time:", "Run:", "Test:"):
        assert label in text, f"{recipe.name}: header lacks {label!r}"
    assert f"lightning-scl fit  --config examples/recipes/{recipe.name}" in text
    if "synthetic" in recipe.read_text():
        assert "not measured" in text.lower() or "needs your data" in text.lower()


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_fast_dev_run(recipe: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the recipes write to ./scl_runs
    text = recipe.read_text()
    args = [
        "fit",
        f"--config={recipe}",
        "--trainer.fast_dev_run=true",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *data_overrides(text, data_dir),
    ]
    cli = run_lightning_cli(args)
    trainer, model = cli.trainer, cli.model
    assert trainer.state.finished and trainer.global_step == 1
    assert model.hparams.num_classes == cli.datamodule.num_classes  # linked, never set twice
    assert tuple(model.example_input_array.shape[1:]) == tuple(cli.datamodule.input_shape)
    if "synthetic=true" in " ".join(args):
        assert cli.datamodule.data_name.endswith("-synthetic")

    config = yaml.safe_load(text)
    configured = {cb["class_path"]: cb.get("init_args", {}) for cb in config["trainer"]["callbacks"]}
    scl = [cb for cb in trainer.callbacks if isinstance(cb, SparseConnectivityLearning)]
    scl_args = configured.get("lightning_scl.callbacks.scl.SparseConnectivityLearning")
    assert len(scl) == (scl_args is not None)
    if scl:
        assert scl[0].masks, "SCL injected no masks"
        assert scl[0].target_density == scl_args.get("target_density")
    elu = "lightning_scl.callbacks.elu.ELUSwap" in configured
    if elu or config["model"].get("model_kwargs", {}).get("activation") == "elu":
        activations = [type(m) for m in model.modules() if isinstance(m, nn.ELU | nn.ReLU)]
        assert activations and all(a is nn.ELU for a in activations), "ReLU left in an ELU recipe"
    assert all(torch.isfinite(p).all() for p in model.parameters())
