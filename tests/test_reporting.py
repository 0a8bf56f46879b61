"""SCLReporter inside SparseConnectivityLearning: FLOPs metrics during a real fit, the end-of-fit report, its files
and TensorBoard figures."""

from __future__ import annotations

import csv
import json
import warnings
from typing import Any

import fvcore.nn
import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_scl.accounting import sparsity_report
from lightning_scl.callbacks.reporting import REPORT_FILES
from lightning_scl.callbacks.scl import SparseConnectivityLearning


class TinyLeNet(L.LightningModule):
    """A LeNet-5-shaped conv net on 14x14 inputs: conv 4@3x3, pool, conv 8@3x3, pool, fc 32-16, fc 16-3."""

    def __init__(self, hidden: int = 16, with_example: bool = True, dict_batches: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 8, 3)
        self.fc1 = nn.Linear(8 * 2 * 2, hidden)
        self.fc2 = nn.Linear(hidden, 3)
        if with_example:
            self.example_input_array = torch.randn(2, 1, 14, 14)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = (batch["image"], batch["label"]) if self.hparams.dict_batches else batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(64, 1, 14, 14, generator=g), torch.randint(0, 3, (64,), generator=g)
        if self.hparams.dict_batches:
            return DataLoader([{"image": a, "label": b} for a, b in zip(x, y)], batch_size=16)
        return DataLoader(TensorDataset(x, y), batch_size=16)


# Per-sample MACs of TinyLeNet, by hand.
TINY_DENSE = 12 * 12 * 4 * 9 + 4 * 4 * 8 * 4 * 9 + 32 * 16 + 16 * 3


def fit(tmp_path, model: L.LightningModule, logger: Any = False, max_steps: int = 8, **scl: Any):
    defaults = {"lam": 0.5, "mask_lr": 0.5, "report_dir": None if logger else str(tmp_path)}
    scl = SparseConnectivityLearning(**(defaults | scl))
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=[scl],
        logger=logger,
        log_every_n_steps=1,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model)
    return trainer, scl


def test_short_fit_logs_metrics_prints_table_and_writes_files(tmp_path, capsys):
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer, scl = fit(tmp_path, TinyLeNet(), logger=logger)
    metrics = trainer.logged_metrics
    assert {"scl/flops", "scl/flops_ratio", "scl/params_kept", "scl/density"} <= set(metrics)
    stats = scl._reporter.accountant.snapshot()
    assert stats.dense_flops == TINY_DENSE
    assert 0 < stats.density < 1  # lam prunes within 8 steps
    last = scl._reporter.history[-1]  # logged before the last mask update, next to scl/density
    assert last["density"] == pytest.approx(float(metrics["scl/density"]))
    assert float(metrics["scl/flops_ratio"]) == pytest.approx(last["flops_ratio"]) and last["flops_ratio"] < 1
    assert float(metrics["scl/flops"]) == pytest.approx(last["flops_ratio"] * TINY_DENSE)
    assert float(metrics["scl/params_kept"]) == pytest.approx(915 - 884 * (1 - last["density"]))

    out = capsys.readouterr().out
    assert out.count("Sparse connectivity") == 1 and "conv2" in out and "Eff. FLOPs" in out

    paths = [tmp_path / "run" / "version_0" / name for name in REPORT_FILES]  # next to the logger's files
    assert all(p.is_file() for p in paths)
    with paths[0].open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == ["conv1", "conv2", "fc1", "fc2", "total"]
    assert int(rows[-1]["effective_flops"]) == stats.effective_flops
    data = json.loads(paths[1].read_text())
    assert [h["step"] for h in data["history"]] == [*range(8), 8]  # plus the final state
    assert data["history"][0]["flops_ratio"] == 1.0 > data["history"][-1]["flops_ratio"]
    for png in paths[2:]:
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "version_0")).Reload()
    assert {"scl/layer_density", "scl/history"} <= set(events.Tags()["images"])
    assert "scl/flops_ratio" in events.Tags()["scalars"]


def test_dense_flops_counted_once_per_fit(tmp_path, monkeypatch):
    calls = []

    class Counting(FlopCountAnalysis):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            calls.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(fvcore.nn, "FlopCountAnalysis", Counting)
    _, scl = fit(tmp_path, TinyLeNet(), regularizer="flops", lam=0.05, max_steps=6)
    assert len(scl._reporter.history) == 6  # six logging steps...
    assert len(calls) == 1  # ...one fvcore trace, shared with the FLOPs-weighted regularizer
    assert scl._reg_scales is not None and scl._reg_scales["conv2"] > scl._reg_scales["fc1"]


@pytest.mark.parametrize("normalize_over", ["unit", "layer"])
def test_flops_regularizer_warns_when_layer_costs_differ_widely_under_a_per_layer_scale(tmp_path, normalize_over):
    # TinyLeNet: a conv1 weight is used at 144 output positions, a Linear weight once.
    match = rf"regularizer='flops'.*'conv1'.*normalize_over='{normalize_over}'.*min_density_per_layer"
    with pytest.warns(UserWarning, match=match):
        fit(tmp_path, TinyLeNet(), regularizer="flops", lam=0.05, max_steps=2, normalize_over=normalize_over)


@pytest.mark.parametrize(
    "settings",
    [{"min_density_per_layer": 0.05, "normalize_over": "layer"}, {"normalize_over": "network"}, {}],
    ids=["floor", "network_statistic", "default"],
)
def test_flops_regularizer_does_not_warn_with_a_floor_or_the_network_statistic(tmp_path, settings):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="(?!SparseConnectivityLearning: with regularizer)")
        scl = fit(tmp_path, TinyLeNet(), regularizer="flops", lam=0.05, max_steps=2, **settings)[1]
    assert max(scl._reg_scales.values()) / min(scl._reg_scales.values()) > 20  # the costs do differ widely


def test_report_false_logs_and_writes_nothing_extra(tmp_path):
    trainer, scl = fit(tmp_path, TinyLeNet(), max_steps=2, report=False)
    assert "scl/density" in trainer.logged_metrics and "scl/flops" not in trainer.logged_metrics
    assert scl._reporter is None and not any((tmp_path / name).exists() for name in REPORT_FILES)


def test_example_input_from_first_batch(tmp_path):
    _, scl = fit(tmp_path, TinyLeNet(with_example=False), max_steps=2)
    acc = scl._reporter.accountant
    assert acc.example_input.shape == (1, 1, 14, 14)
    assert acc.snapshot().dense_flops == TINY_DENSE


def test_no_example_input_and_no_usable_batch_still_trains(tmp_path, capsys):
    model = TinyLeNet(with_example=False, dict_batches=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(tmp_path, model, max_steps=4)
    assert trainer.global_step == 4
    said = [str(w.message) for w in caught if "FLOPs unavailable" in str(w.message)]
    assert len(said) == 1 and "dict" in said[0]  # said once, with the reason
    assert "scl/params_kept" in trainer.logged_metrics and "scl/flops" not in trainer.logged_metrics
    assert "FLOPs: unavailable" in capsys.readouterr().out
    assert all((tmp_path / name).is_file() for name in REPORT_FILES)  # no logger: report_dir
    data = json.loads((tmp_path / "scl_report.json").read_text())
    assert data["totals"]["dense_flops"] is None and "example_input_array" in data["flops_note"]
    assert data["history"][-1]["flops_ratio"] is None


def test_fit_without_batches_still_reports(tmp_path):
    model = TinyLeNet(with_example=False)
    scl = SparseConnectivityLearning(lam=1.0, report_dir=str(tmp_path))
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=0,
        callbacks=[scl],
        logger=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model)
    data = json.loads((tmp_path / "scl_report.json").read_text())
    assert data["totals"]["density"] == 1.0 and data["totals"]["dense_flops"] is None
    assert [h["step"] for h in data["history"]] == [0]


def test_report_from_a_real_checkpoint(tmp_path):
    trainer, scl = fit(tmp_path, TinyLeNet(hidden=12), granularity="channel", max_steps=6)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    live = scl._reporter.accountant.report()
    counts_only = sparsity_report(path)
    assert counts_only.totals.params_kept == live.totals.params_kept
    assert [r.density for r in counts_only.rows] == [r.density for r in live.rows]
    rebuilt = sparsity_report(path, model_class=TinyLeNet)  # FLOPs on its example_input_array
    assert rebuilt.totals == live.totals
    assert [r.effective_flops for r in rebuilt.rows] == [r.effective_flops for r in live.rows]


def test_lightning_model_summary_counts_mask_variables_as_parameters(tmp_path):
    # The troubleshooting page quotes these numbers: LeNet-300-100's 266,610 parameters plus 266,200 weight masks.
    from lightning.pytorch.utilities.model_summary import ModelSummary

    from lightning_scl.models import ImageClassifier

    class Classifier(ImageClassifier):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(TensorDataset(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))), batch_size=8)

    model = Classifier("lenet300")
    dense = sum(p.numel() for p in model.parameters())
    fit(tmp_path, model, max_steps=1)
    assert dense == 266_610
    assert ModelSummary(model).total_parameters == dense + 266_200 == 532_810
