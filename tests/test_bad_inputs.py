"""The bad-input table: each misuse of the public API, the command line or a config raises an error that names the
problem and the fix.

``CASES`` is one table. Each row holds what the user did, how to trigger it, the exception type it should raise, a
regular expression the message must match for the PROBLEM and one for the FIX, the excerpt of today's message the docs
quote, and the advice the docs give. The same rows render the Markdown table of the troubleshooting page::

    python tests/test_bad_inputs.py --render docs/snippets/troubleshooting_table.md

and ``test_troubleshooting_table_is_current`` fails when the committed table differs from a fresh render.

A row whose message lacks the fix today carries ``gap`` (why): it is expected to fail its checks (``xfail``, strict,
only on :class:`MessageGap`), so it flips to a failure once the library's message is improved: then drop ``gap``.
Checks that are not about the message (the misuse raises at all, the docs' excerpt is what users see today) fail
for real on every row.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn

from lightning_scl import (
    ELUSwap,
    SparseConnectivityLearning,
    apply_elu,
    export_pruned,
    inject_masks,
    load_pruned,
    swap_activations,
)
from lightning_scl._fetch import SOURCES
from lightning_scl.accounting import sparsity_report
from lightning_scl.cli import main as cli_main
from lightning_scl.data import ChecksumError, CIFAR10DataModule, ImageNetDataModule, MNISTDataModule
from lightning_scl.memory import retain_freed_memory

ROOT = Path(__file__).resolve().parents[1]
# Under docs/snippets/: mkdocs excludes that folder from the pages (exclude_docs), so the table is included, not a page.
TABLE = ROOT / "docs" / "snippets" / "troubleshooting_table.md"
RENDER_COMMAND = "python tests/test_bad_inputs.py --render docs/snippets/troubleshooting_table.md"

Trigger = Callable[[], object]


class CLIExit(Exception):
    """``lightning-scl`` returned (or exited with) a non-zero status; ``stderr`` is what it printed."""

    def __init__(self, status: int, stderr: str) -> None:
        super().__init__(stderr)
        self.status, self.stderr = status, stderr


class MessageGap(AssertionError):
    """The error's type, problem or fix is not what a user needs (the only failure a ``gap`` row may have)."""


@dataclass(frozen=True)
class Case:
    """One misuse.

    Attributes:
        id: the pytest id.
        did: what the user did (Markdown, for the docs).
        make: ``make(tmp_path)`` prepares whatever the misuse needs and returns a zero-argument callable committing it.
        raises: the exception type a user should get.
        problem: regular expression the message must match: it names what is wrong.
        fix: regular expression the message must match: it says what to do.
        says: an excerpt of the message users see today, ``"<Type>: <message>"`` (``"exit status N: <stderr>"`` for
            the command line), file paths relative to the folder of the run; quoted in the docs.
        todo: what to do (Markdown, for the docs).
        gap: why the message falls short today (the row is then an expected failure); None when it is complete.
    """

    id: str
    did: str
    make: Callable[[Path], Trigger]
    raises: type[BaseException]
    problem: str
    fix: str
    says: str
    todo: str
    gap: str | None = None


# ---------------------------------------------------------------------------------------------------- triggers


def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[Path], Trigger]:
    """A trigger that needs no files: ``fn(*args, **kwargs)``."""
    return lambda tmp: functools.partial(fn, *args, **kwargs)


def _cli(argv: list[str]) -> None:
    """Run ``lightning-scl argv``; a non-zero status becomes :class:`CLIExit` with the captured stderr."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = cli_main(argv)
    except SystemExit as exit_:  # argparse and LightningCLI exit on a parse error
        status = exit_.code if isinstance(exit_.code, int) else 1
    if status:
        raise CLIExit(status, err.getvalue())


def cli(*argv: str) -> Callable[[Path], Trigger]:
    """A command-line trigger; ``{tmp}`` in an argument is the run's folder."""
    return lambda tmp: functools.partial(_cli, [a.format(tmp=tmp) for a in argv])


def _mlp() -> type[nn.Module]:
    from tests.conftest import MLP  # lazily: rendering the table needs no test helpers

    return MLP


def _masked_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    inject_masks(net)
    return net


def _masked_checkpoint(tmp: Path) -> Path:
    """A checkpoint as SCL training writes it (masked MLP state, hyper_parameters), without running a Trainer."""
    torch.manual_seed(0)
    model = _mlp()()
    inject_masks(model)
    path = tmp / "run.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path


def _other_architecture() -> type[nn.Module]:
    """The conftest MLP with a 7-way head: what a checkpoint of the 4-way MLP does not fit."""

    class SevenWayMLP(_mlp()):
        def __init__(self, **hparams: Any) -> None:
            super().__init__(**hparams)
            self.head = nn.Linear(self.hparams.hidden, 7)

    return SevenWayMLP


def include_matches_nothing(tmp: Path) -> Trigger:
    from tests.conftest import loader, quiet_trainer

    trainer = quiet_trainer(
        max_steps=1, default_root_dir=tmp, callbacks=[SparseConnectivityLearning(include=["encoder.*"])]
    )
    return functools.partial(trainer.fit, _mlp()(), loader(n=32))


def target_density_without_end(tmp: Path) -> Trigger:
    from tests.conftest import loader, quiet_trainer

    scl = SparseConnectivityLearning(target_density=0.05, report=False)
    trainer = quiet_trainer(max_epochs=-1, max_steps=-1, default_root_dir=tmp, callbacks=[scl])
    return functools.partial(trainer.fit, _mlp()(), loader(n=32))


def resume_with_other_selection(tmp: Path) -> Trigger:
    from tests.conftest import loader, quiet_trainer

    torch.manual_seed(0)
    first = quiet_trainer(max_steps=1, default_root_dir=tmp, callbacks=[SparseConnectivityLearning(report=False)])
    first.fit(_mlp()(), loader(n=32))
    first.save_checkpoint(tmp / "run.ckpt")
    scl = SparseConnectivityLearning(exclude=["head"], report=False)
    second = quiet_trainer(max_steps=2, default_root_dir=tmp, callbacks=[scl])
    return functools.partial(second.fit, _mlp()(), loader(n=32), ckpt_path=tmp / "run.ckpt")


def sharded_fsdp_across_gpus(tmp: Path) -> Trigger:
    # Lightning builds FSDP only on CUDA: this stands in for the trainer of a 4-GPU run at the callback's setup.
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    trainer = SimpleNamespace(strategy=FSDPStrategy(), world_size=4)
    return functools.partial(SparseConnectivityLearning(report=False).setup, trainer, _mlp()(), "fit")


def swap_again_differently(tmp: Path) -> Trigger:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    swap_activations(model, alpha=1.0)
    return functools.partial(swap_activations, model, alpha=0.5)


def export_unmasked(tmp: Path) -> Trigger:
    return functools.partial(export_pruned, nn.Linear(4, 2), tmp / "model.safetensors")


def export_unknown_format(tmp: Path) -> Trigger:
    return functools.partial(export_pruned, _masked_net(), tmp / "model.tflite", format="tflite")


def export_into_missing_folder(tmp: Path) -> Trigger:
    return functools.partial(export_pruned, _masked_net(), tmp / "exports" / "model.safetensors")


def export_onto_folder(tmp: Path) -> Trigger:
    (tmp / "exports").mkdir()
    return functools.partial(export_pruned, _masked_net(), tmp / "exports")


def export_onto_its_checkpoint(tmp: Path) -> Trigger:
    path = _masked_checkpoint(tmp).rename(tmp / "last.pt")
    return functools.partial(export_pruned, path, path, format="state_dict")


def export_fp16_overflow(tmp: Path) -> Trigger:
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    inject_masks(net, layers=[("0", net[0])])
    net[1].running_var.fill_(1.0e5)
    return functools.partial(export_pruned, net, tmp / "model.safetensors", dtype="float16")


def export_wrong_example_shape(tmp: Path) -> Trigger:
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 30), nn.ReLU(), nn.Linear(30, 10))
    inject_masks(net)
    example = torch.zeros(1, 3, 32, 32)
    return functools.partial(export_pruned, net, tmp / "model.shrunk.pt", format="shrunk", example_input=example)


def imagenet_renamed_val_classes(tmp: Path) -> Trigger:
    from PIL import Image

    for split, names in (("train", ("n01440764", "n01443537")), ("val", ("tench", "goldfish"))):
        for name in names:
            (tmp / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp / split / name / "0.png")
    module = ImageNetDataModule(str(tmp / "train"), str(tmp / "val"), num_classes=2, num_workers=0)
    return functools.partial(module.setup, "fit")


def averaging_before_scl(tmp: Path) -> Trigger:
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from tests.conftest import loader, quiet_trainer

    callbacks = [EMAWeightAveraging(), SparseConnectivityLearning(report=False)]
    trainer = quiet_trainer(max_steps=1, default_root_dir=tmp, callbacks=callbacks)
    return functools.partial(trainer.fit, _mlp()(), loader(n=32))


def mask_tied_weight(tmp: Path) -> Trigger:
    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight

    return functools.partial(inject_masks, TiedLM())


def epoch_freeze_before_ramp_end(tmp: Path) -> Trigger:
    from tests.conftest import loader, quiet_trainer

    scl = SparseConnectivityLearning(target_density=0.1, freeze_masks_at=1, report=False)
    trainer = quiet_trainer(max_epochs=4, default_root_dir=tmp, callbacks=[scl])
    return functools.partial(trainer.fit, _mlp()(), loader(n=32))


def masks_with_another_ste(tmp: Path) -> Trigger:
    from tests.conftest import loader, quiet_trainer

    model = _mlp()()
    first = quiet_trainer(max_steps=1, default_root_dir=tmp, callbacks=[SparseConnectivityLearning(report=False)])
    first.fit(model, loader(n=32))
    scl = SparseConnectivityLearning(ste="softplus", report=False)
    second = quiet_trainer(max_steps=1, default_root_dir=tmp, callbacks=[scl])
    return functools.partial(second.fit, model, loader(n=32))


def export_other_architecture(tmp: Path) -> Trigger:
    return functools.partial(
        export_pruned, _masked_checkpoint(tmp), tmp / "model.safetensors", model_class=_other_architecture()
    )


def export_shrunk_without_class(tmp: Path) -> Trigger:
    return functools.partial(export_pruned, _masked_checkpoint(tmp), tmp / "model.shrunk.pt", format="shrunk")


def _compressed(tmp: Path) -> tuple[Path, bytes]:
    path = export_pruned(_masked_net(), tmp / "model.scl.safetensors", format="compressed")
    return path, path.read_bytes()


def load_corrupted(tmp: Path) -> Trigger:
    path, data = _compressed(tmp)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one bit pattern flipped in the stored values
    return functools.partial(load_pruned, path)


def load_truncated(tmp: Path) -> Trigger:
    path, data = _compressed(tmp)
    path.write_bytes(data[:-10])  # an interrupted copy
    return functools.partial(load_pruned, path)


def load_shrunk_as_pruned(tmp: Path) -> Trigger:
    path = export_pruned(_masked_net(), tmp / "model.shrunk.pt", format="shrunk", example_input=torch.zeros(1, 4))
    return functools.partial(load_pruned, path)


def mnist_corrupted(tmp: Path) -> Trigger:
    raw = tmp / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"<html>404 Not Found</html>")  # a failed download, say
    return MNISTDataModule(data_dir=str(tmp / "data"), download=False).prepare_data


def mnist_data_dir_is_a_file(tmp: Path) -> Trigger:
    (tmp / "data").write_text("not a folder")
    datamodule = MNISTDataModule(data_dir=str(tmp / "data"), download=True)

    def prepare() -> None:
        with mock.patch.dict(SOURCES, {"MNIST": ()}):  # never reach the network, whatever happens
            datamodule.prepare_data()

    return prepare


def report_not_a_checkpoint(tmp: Path) -> Trigger:
    (tmp / "notes.txt").write_text("hello")
    return functools.partial(sparsity_report, tmp / "notes.txt")


def report_other_architecture(tmp: Path) -> Trigger:
    return functools.partial(sparsity_report, _masked_checkpoint(tmp), model_class=_other_architecture())


def cli_export_other_class(tmp: Path) -> Trigger:
    # default --model-class: ImageClassifier (weight formats fall back to the tensors alone; shrunk needs the class)
    return cli("export", str(_masked_checkpoint(tmp)), "--format", "shrunk")(tmp)


def cli_config_bad_value(tmp: Path) -> Trigger:
    config = tmp / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            trainer:
              logger: false
              max_steps: 1
              default_root_dir: {tmp}
              callbacks:
                - class_path: lightning_scl.callbacks.scl.SparseConnectivityLearning
                  init_args:
                    target_density: 2.0
            data:
              class_path: lightning_scl.data.MNISTDataModule
              init_args:
                data_dir: {tmp / "data"}
                download: false
            """
        )
    )
    return cli("fit", "--config", str(config))(tmp)


# ---------------------------------------------------------------------------------------------------- the table

_EXPORT_AGAIN = r"export(ed)? it again|re-?export|copy it again|re-?copy|download it again"

CASES: list[Case] = [
    # ------------------------------------------------------------ SparseConnectivityLearning arguments
    Case(
        id="scl-lam-negative",
        did="`SparseConnectivityLearning(lam=-0.5)`",
        make=call(SparseConnectivityLearning, lam=-0.5),
        raises=ValueError,
        problem=r"\blam must be .*got -0\.5",
        fix=r">= 0 \(0 disables",
        says="ValueError: lam must be a number >= 0 (0 disables the regularizer), got -0.5",
        todo="Give `lam >= 0` (0 turns the regularizer off), or `target_density` instead.",
    ),
    Case(
        id="scl-lam-string",
        did='`lam: "0.1"` in a YAML file (a quoted number is a string)',
        make=call(SparseConnectivityLearning, lam="0.1"),
        raises=ValueError,
        problem=r"\blam .*got '0\.1'",
        fix=r"must be a number",
        says="ValueError: lam must be a number >= 0 (0 disables the regularizer), got '0.1'",
        todo="Write the number unquoted: `lam: 0.1`.",
    ),
    Case(
        id="scl-lam-and-target-density",
        did="`SparseConnectivityLearning(lam=0.1, target_density=0.05)`",
        make=call(SparseConnectivityLearning, lam=0.1, target_density=0.05),
        raises=ValueError,
        problem=r"lam .*target_density .*not both",
        fix=r"Give either lam",
        says="ValueError: Give either lam (a fixed regularizer strength) or target_density",
        todo="Keep one: `lam` for a fixed pressure, `target_density` to aim at a final density.",
    ),
    Case(
        id="scl-target-density-zero",
        did="`SparseConnectivityLearning(target_density=0)`",
        make=call(SparseConnectivityLearning, target_density=0),
        raises=ValueError,
        problem=r"target_density .*got 0$",
        fix=r"in \(0, 1\]",
        says="ValueError: target_density must be in (0, 1] (fraction of connections kept), got 0",
        todo="Give the fraction of connections to keep, above 0 (e.g. `0.05`); 0 would remove the whole network.",
    ),
    Case(
        id="scl-target-density-above-one",
        did="`SparseConnectivityLearning(target_density=1.5)` (a percentage meant as a fraction?)",
        make=call(SparseConnectivityLearning, target_density=1.5),
        raises=ValueError,
        problem=r"target_density .*got 1\.5",
        fix=r"in \(0, 1\] \(fraction",
        says="ValueError: target_density must be in (0, 1] (fraction of connections kept), got 1.5",
        todo="Give a fraction, not a percentage: 1.5% is `0.015`.",
    ),
    Case(
        id="scl-unknown-ste",
        did='`SparseConnectivityLearning(ste="relu")`',
        make=call(SparseConnectivityLearning, ste="relu"),
        raises=ValueError,
        problem=r"\bste .*got 'relu'",
        fix=r"one of \['identity', 'leaky_relu', 'softplus'\]",
        says="ValueError: ste must be one of ['identity', 'leaky_relu', 'softplus'], got 'relu'",
        todo="Use `identity` (default), `leaky_relu` or `softplus`.",
    ),
    Case(
        id="scl-ste-slope-zero",
        did='`SparseConnectivityLearning(ste="leaky_relu", ste_slope=0)`',
        make=call(SparseConnectivityLearning, ste="leaky_relu", ste_slope=0),
        raises=ValueError,
        problem=r"ste_slope .*got 0\b",
        fix=r"must be > 0",
        says="ValueError: ste_slope must be > 0, got 0",
        todo="Give a positive slope (default `0.1`): with 0, masks below the threshold could never revive.",
    ),
    Case(
        id="scl-unknown-normalize",
        did='`SparseConnectivityLearning(normalize="std")`',
        make=call(SparseConnectivityLearning, normalize="std"),
        raises=ValueError,
        problem=r"normalize .*got 'std'",
        fix=r"one of \['mean_abs', 'l2', 'max_abs', 'none'\]",
        says="ValueError: normalize must be one of ['mean_abs', 'l2', 'max_abs', 'none'], got 'std'",
        todo="Use `mean_abs` (default), `l2`, `max_abs` or `none`.",
    ),
    Case(
        id="scl-unit-normalization-on-channel-masks",
        did='`SparseConnectivityLearning(granularity="channel", normalize_over="unit")`',
        make=call(SparseConnectivityLearning, granularity="channel", normalize_over="unit"),
        raises=ValueError,
        problem=r"normalize_over='unit' needs granularity='weight'",
        fix=r"Use normalize_over='layer'",
        says="ValueError: normalize_over='unit' needs granularity='weight': a channel mask has one variable per unit, "
        "so per-unit normalization would reduce every gradient to its sign. Use normalize_over='layer'.",
        todo="Leave `normalize_over` unset (channel masks are normalized per layer) or set it to `layer`.",
    ),
    Case(
        id="scl-unknown-granularity",
        did='`SparseConnectivityLearning(granularity="filter")`',
        make=call(SparseConnectivityLearning, granularity="filter"),
        raises=ValueError,
        problem=r"granularity .*got 'filter'",
        fix=r"one of \['weight', 'channel'\]",
        says="ValueError: granularity must be one of ['weight', 'channel'], got 'filter'",
        todo='Use `channel` for whole filters/units (physically smaller after `format="shrunk"`), or `weight`.',
    ),
    Case(
        id="scl-sharded-fsdp",
        did='`Trainer(strategy="fsdp", devices=4)` (sharded FSDP across 4 GPUs) with `SparseConnectivityLearning`',
        make=sharded_fsdp_across_gpus,
        raises=ValueError,
        problem=r"does not support sharded FSDP across 4 processes",
        fix=r"strategy='ddp', or FSDPStrategy\(sharding_strategy='NO_SHARD'\)",
        says="ValueError: SparseConnectivityLearning does not support sharded FSDP across 4 processes",
        todo='Use `strategy="ddp"`, or `FSDPStrategy(sharding_strategy="NO_SHARD")`; FSDP on one GPU works as is.',
    ),
    Case(
        id="scl-bad-regex",
        did='`SparseConnectivityLearning(include=["re:fc("])`',
        make=call(SparseConnectivityLearning, include=["re:fc("]),
        raises=ValueError,
        problem=r"'re:fc\(' is not a valid regular expression",
        fix=r"Fix the expression, or drop the 're:' prefix",
        says="ValueError: include: 're:fc(' is not a valid regular expression",
        todo="Fix the expression (`re:fc\\d`), or drop `re:` and write a glob (`fc*`).",
    ),
    Case(
        id="scl-unknown-layer-type",
        did='`SparseConnectivityLearning(layer_types=["Dense"])`',
        make=call(SparseConnectivityLearning, layer_types=["Dense"]),
        raises=ValueError,
        problem=r"'Dense' is not a torch\.nn layer class",
        fix=r"Use a name from torch\.nn .*dotted path",
        says="ValueError: layer_types: 'Dense' is not a torch.nn layer class",
        todo="Name `torch.nn` classes (`Linear`, `Conv2d`...) or give a dotted path (`my_pkg.layers.MyConv`).",
    ),
    Case(
        id="scl-include-matches-nothing",
        did='`include=["encoder.*"]` on a model without an `encoder`; `trainer.fit`',
        make=include_matches_nothing,
        raises=ValueError,
        problem=r"'encoder\.\*' matches no maskable layer",
        fix=r"Candidates: \['net\.0', 'net\.2', 'head'\]",
        says="ValueError: include pattern 'encoder.*' matches no maskable layer. "
        "Candidates: ['net.0', 'net.2', 'head']",
        todo="Pick names from the listed candidates; patterns are globs on qualified names (`net.*`) or `re:<regex>`.",
    ),
    Case(
        id="scl-target-density-endless-training",
        did="`target_density=0.05` with `Trainer(max_epochs=-1)` (no end)",
        make=target_density_without_end,
        raises=ValueError,
        problem=r"need a finite training length",
        fix=r"set Trainer\(max_epochs=\.\.\.\) or Trainer\(max_steps=\.\.\.\)",
        says="ValueError: target_density and a fractional freeze_masks_at (default 0.7) need a finite training length",
        todo="Set `max_epochs` or `max_steps` (the density schedule and the default freeze point are fractions of "
        "training), or use `lam` with `freeze_masks_at=None` or an epoch number.",
    ),
    Case(
        id="scl-freeze-before-ramp-end",
        did="`SparseConnectivityLearning(target_density=0.05, ramp_end=0.8)` (default `freeze_masks_at=0.7`)",
        make=call(SparseConnectivityLearning, target_density=0.05, ramp_end=0.8),
        raises=ValueError,
        problem=r"freeze the masks before the density schedule reaches target_density",
        fix=r"set freeze_masks_at above ramp_end \(e\.g\. 0\.95\) or None",
        says="ValueError: freeze_masks_at=0.7 would freeze the masks before the density schedule reaches "
        "target_density at ramp_end=0.8: set freeze_masks_at above ramp_end (e.g. 0.95) or None.",
        todo="Freeze after the ramp: `freeze_masks_at` greater than `ramp_end`, or `None` to never freeze.",
    ),
    Case(
        id="scl-epoch-freeze-before-ramp-end",
        did="`SparseConnectivityLearning(target_density=0.1, freeze_masks_at=1)` with `Trainer(max_epochs=4)`",
        make=epoch_freeze_before_ramp_end,
        raises=ValueError,
        problem=r"freeze the masks before the density schedule reaches target_density",
        fix=r"give a later epoch \(e\.g\. 3\) or None",
        says="ValueError: freeze_masks_at=1 (epoch) of max_epochs=4 would freeze the masks before the density "
        "schedule reaches target_density at ramp_end=0.5 (epoch 2): give a later epoch (e.g. 3) or None.",
        todo="Freeze after the ramp: an epoch past `ramp_end * max_epochs`, or `None` to never freeze.",
    ),
    Case(
        id="scl-masks-with-another-ste",
        did='A second `fit` of an SCL-trained model with `SparseConnectivityLearning(ste="softplus")`',
        make=masks_with_another_ste,
        raises=ValueError,
        problem=r"already carries a mask with ste='identity'",
        fix=r"Use the settings the masks were made with, or fold them first",
        says="ValueError: Layer 'net.0' already carries a mask with ste='identity' (slope 0.1) but this callback "
        "uses ste='softplus' (ste_slope 0.1).",
        todo="Continue with the estimator the masks were made with, or `strip_masks(model)` to fold them and start "
        "new masks.",
    ),
    Case(
        id="scl-tied-weight",
        did="Masking a `Linear` head whose weight is tied to an `Embedding` (default layer selection)",
        make=mask_tied_weight,
        raises=ValueError,
        problem=r"'head' shares \(ties\) its weight with 'emb.weight', which is not being masked",
        fix=r"Exclude 'head' from masking",
        says="ValueError: Layer 'head' shares (ties) its weight with 'emb.weight', which is not being masked",
        todo='Keep the tied layer dense: `SparseConnectivityLearning(exclude=["head"])`; or untie the weights.',
    ),
    Case(
        id="scl-negative-fan-in-exponent",
        did="`SparseConnectivityLearning(fan_in_exponent=-1)`",
        make=call(SparseConnectivityLearning, fan_in_exponent=-1),
        raises=ValueError,
        problem=r"fan_in_exponent must be a number >= 0",
        fix=r"0 disables the scaling",
        says="ValueError: fan_in_exponent must be a number >= 0 (0 disables the scaling), got -1",
        todo="Use 0.5 (the default for weight masks), 0 for uniform pressure, or another value >= 0.",
    ),
    Case(
        id="scl-unknown-mask-lr-schedule",
        did='`SparseConnectivityLearning(mask_lr_schedule="linear")`',
        make=call(SparseConnectivityLearning, mask_lr_schedule="linear"),
        raises=ValueError,
        problem=r"mask_lr_schedule .*got 'linear'",
        fix=r"one of \['constant', 'cosine'\]",
        says="ValueError: mask_lr_schedule must be one of ['constant', 'cosine'], got 'linear'",
        todo="Use `constant` (default) or `cosine`.",
    ),
    Case(
        id="scl-resume-other-layer-selection",
        did='`fit(ckpt_path=...)` with `exclude=["head"]` on a checkpoint whose run masked `head` too',
        make=resume_with_other_selection,
        raises=ValueError,
        problem=r"(?s)checkpoint.*head",
        fix=r"use the layer_types/include/exclude and granularity of the run that wrote it",
        says="ValueError: The checkpoint was written with masks on ['net.0', 'net.2', 'head'] (granularity",
        todo="Resume with the `layer_types`, `include`, `exclude` and `granularity` of the run that wrote the "
        "checkpoint; to change them, start a new run (or fine-tune from exported weights).",
    ),
    # ------------------------------------------------------------ ELUSwap
    Case(
        id="elu-unknown-target",
        did='`ELUSwap(targets=["Relu"])`',
        make=call(ELUSwap, targets=["Relu"]),
        raises=ValueError,
        problem=r"unknown activation\(s\) \['Relu'\]",
        fix=r"accepted: \[.*'ReLU'.*\]",
        says="ValueError: targets: unknown activation(s) ['Relu']; accepted: ['CELU', 'ELU', 'GELU'",
        todo="Use the exact `torch.nn` class names listed (`ReLU`, `ReLU6`, `LeakyReLU`...).",
    ),
    Case(
        id="memory-mmap-threshold-above-limit",
        did="`retain_freed_memory(mmap_threshold=64 * 2**20)`",
        make=call(retain_freed_memory, mmap_threshold=64 * 2**20),
        raises=ValueError,
        problem=r"mmap_threshold=67108864 is above glibc's limit of 33554432 bytes",
        fix=r"Pass at most 33554432",
        says="ValueError: mmap_threshold=67108864 is above glibc's limit of 33554432 bytes (32 MiB on 64-bit systems)",
        todo="Pass at most `33554432` (the default): larger blocks always get a mapping of their own.",
    ),
    Case(
        id="elu-alpha-zero",
        did="`ELUSwap(alpha=0)`",
        make=call(ELUSwap, alpha=0),
        raises=ValueError,
        problem=r"alpha .*got 0$",
        fix=r"finite number > 0",
        says="ValueError: alpha must be a finite number > 0, got 0",
        todo="Give a positive `alpha` (the papers use `1.0`).",
    ),
    Case(
        id="elu-unknown-functional",
        did='`ELUSwap(functional="rewrite_all")`',
        make=call(ELUSwap, functional="rewrite_all"),
        raises=ValueError,
        problem=r"functional .*got 'rewrite_all'",
        fix=r"one of \['rewrite', 'warn', 'ignore'\]",
        says="ValueError: functional must be one of ['rewrite', 'warn', 'ignore'], got 'rewrite_all'",
        todo="Use `rewrite` (default: `F.relu` calls become ELU too), `warn` or `ignore`.",
    ),
    Case(
        id="elu-swap-again-differently",
        did="`swap_activations(model, alpha=0.5)` on a model already swapped with `alpha=1.0`",
        make=swap_again_differently,
        raises=ValueError,
        problem=r"already swapped with SwapConfig\(alpha=1\.0",
        fix=r"call restore_activations\(module\) before swapping",
        says="ValueError: module was already swapped with SwapConfig(alpha=1.0",
        todo="Call `restore_activations(model)` first, then swap with the new settings.",
    ),
    Case(
        id="elu-apply-without-record",
        did="`apply_elu(model, checkpoint)` on a checkpoint saved without `ELUSwap`",
        make=call(apply_elu, nn.Sequential(nn.ReLU()), {"state_dict": {}}),
        raises=ValueError,
        problem=r"no activation swap record",
        fix=r"pass the settings as keyword arguments",
        says="ValueError: checkpoint has no activation swap record",
        todo="Pass the settings yourself: `apply_elu(model, alpha=1.0)`.",
    ),
    # ------------------------------------------------------------ export
    Case(
        id="export-unmasked-model",
        did="`export_pruned(model, path)` on a model never trained with SCL",
        make=export_unmasked,
        raises=ValueError,
        problem=r"Linear has no connectivity masks",
        fix=r"Train it with SparseConnectivityLearning \(or call lightning_scl\.masking\.inject_masks\)",
        says="ValueError: Linear has no connectivity masks: nothing to export.",
        todo="Export the model the `SparseConnectivityLearning` callback trained (or its checkpoint).",
    ),
    Case(
        id="export-unknown-format",
        did='`export_pruned(model, path, format="tflite")`',
        make=export_unknown_format,
        raises=ValueError,
        problem=r"Unknown export format 'tflite'",
        fix=r"choose one of \['safetensors', .*'onnx'",
        says="ValueError: Unknown export format 'tflite'; choose one of ['safetensors'",
        todo="Pick a listed format; for other runtimes export `onnx` and convert.",
    ),
    Case(
        id="export-into-missing-folder",
        did='`export_pruned(model, "exports/model.safetensors")` without an `exports` folder',
        make=export_into_missing_folder,
        raises=FileNotFoundError,
        problem=r"directory 'exports' does not exist",
        fix=r"create it|mkdir|existing (folder|directory)",
        says="FileNotFoundError: [Errno 2] Cannot export to 'exports/model.safetensors': directory 'exports' does "
        "not exist; create it first (mkdir -p exports)",
        todo="Create the folder first (`mkdir -p exports`), or write to an existing one.",
    ),
    Case(
        id="export-onto-folder",
        did='`export_pruned(model, "exports")` where `exports` is a folder',
        make=export_onto_folder,
        raises=IsADirectoryError,
        problem=r"'exports': it is a directory",
        fix=r"give a file path",
        says="IsADirectoryError: [Errno 21] Cannot export to 'exports': it is a directory; give a file path",
        todo="Give a file name inside it: `exports/model.safetensors`.",
    ),
    Case(
        id="export-onto-its-checkpoint",
        did='`export_pruned("last.pt", "last.pt", format="state_dict")`: the output is the checkpoint itself',
        make=export_onto_its_checkpoint,
        raises=ValueError,
        problem=r"it is the checkpoint being exported",
        fix=r"Give another output path",
        says="ValueError: Cannot export to 'last.pt': it is the checkpoint being exported",
        todo="Write the export to another file; `lightning-scl export last.pt -f state_dict` writes `last.pruned.pt`.",
    ),
    Case(
        id="export-wrong-example-shape",
        did='`export_pruned(model, path, format="shrunk", example_input=torch.zeros(1, 3, 32, 32))` for an MNIST model',
        make=export_wrong_example_shape,
        raises=ValueError,
        problem=r"cannot run on the example input of shape \(1, 3, 32, 32\)",
        fix=r"Give a batch shaped like the model's input, of its dtype and on its device",
        says="ValueError: format='shrunk': Sequential cannot run on the example input of shape (1, 3, 32, 32) "
        "(torch.float32 on cpu): RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x3072 and 784x30)",
        todo="Pass a batch shaped like the model's input (`--input-shape 1,1,28,28` on the command line), or set "
        "`example_input_array`.",
    ),
    Case(
        id="imagenet-renamed-val-classes",
        did="`ImageNetDataModule(train_dir, val_dir)` whose val class folders are named differently from train's",
        make=imagenet_renamed_val_classes,
        raises=ValueError,
        problem=r"differ from those of .*the labels would not match",
        fix=r"Use the same folder names",
        says="ValueError: The class folders of val differ from those of train (only in train: ['n01440764', "
        "'n01443537'], only in val: ['goldfish', 'tench']",
        todo="Name the class folders alike in both (the WordNet ids); sort ImageNet's flat `val/` into class "
        "subfolders first.",
    ),
    Case(
        id="averaging-before-scl",
        did="`Trainer(callbacks=[EMAWeightAveraging(), SparseConnectivityLearning()])`: the averaging callback first",
        make=averaging_before_scl,
        raises=ValueError,
        problem=r"EMAWeightAveraging comes before SparseConnectivityLearning",
        fix=r"List SparseConnectivityLearning first",
        says="ValueError: EMAWeightAveraging comes before SparseConnectivityLearning in Trainer(callbacks=[...]). It "
        "copies the model in its setup, before the masks exist",
        todo="Put `SparseConnectivityLearning` before `EMAWeightAveraging` / `StochasticWeightAveraging` in the list.",
    ),
    Case(
        id="export-float16-overflow",
        did='`export_pruned(model, path, dtype="float16")` with a value above 65504 (a BatchNorm variance)',
        make=export_fp16_overflow,
        raises=ValueError,
        problem=r"cannot represent \(they would become inf\)",
        fix=r"Export with dtype='float32'",
        says="ValueError: '1.running_var' holds 4 value(s) up to 100000 that torch.float16 cannot represent",
        todo="Export in `float32`, or `bfloat16` (float32's range, fewer digits).",
    ),
    Case(
        id="export-other-architecture",
        did='`export_pruned("run.ckpt", path, model_class=OtherModel)`: not the class the checkpoint was trained with',
        make=export_other_architecture,
        raises=ValueError,
        problem=r"does not match SevenWayMLP: shape mismatch: 'head\.bias'",
        fix=r"(class|model).{0,60}(trained with|wrote the checkpoint)",
        says="ValueError: The checkpoint does not match SevenWayMLP: shape mismatch: 'head.bias': checkpoint (4,) vs "
        "model (7,)",
        todo="Pass the class (and hyper-parameters) the checkpoint was trained with; the message lists the keys and "
        "shapes that differ.",
    ),
    Case(
        id="export-shrunk-without-model-class",
        did='`export_pruned("run.ckpt", path, format="shrunk")` without `model_class`',
        make=export_shrunk_without_class,
        raises=ValueError,
        problem=r"format='shrunk' from a checkpoint",
        fix=r"needs model_class",
        says="ValueError: format='shrunk' from a checkpoint needs model_class (the LightningModule class)",
        todo="Pass `model_class=MyLightningModule` (rebuilt from the checkpoint's hyper-parameters).",
    ),
    Case(
        id="load-corrupted-compressed",
        did="`load_pruned(path)` on a compressed export whose bytes were altered",
        make=load_corrupted,
        raises=ValueError,
        problem=r"'model\.scl\.safetensors' is corrupted: its checksum does not match",
        fix=_EXPORT_AGAIN,
        says="ValueError: 'model.scl.safetensors' is corrupted: its checksum does not match the stored one. Export it "
        "again from the checkpoint or the trained model, or copy it again if it was transferred.",
        todo="Export it again from the checkpoint or the trained model, or copy it again if it was transferred.",
    ),
    Case(
        id="load-truncated",
        did="`load_pruned(path)` on an export cut short (an interrupted copy)",
        make=load_truncated,
        raises=ValueError,
        problem=r"'model\.scl\.safetensors' is not a readable safetensors file \(corrupted or truncated\?\)",
        fix=_EXPORT_AGAIN,
        says="ValueError: 'model.scl.safetensors' is not a readable safetensors file (corrupted or truncated?)",
        todo="Compare the file size with the original and copy it again, or export it again.",
    ),
    Case(
        id="load-shrunk-with-load-pruned",
        did='`load_pruned("model.shrunk.pt")` on a `format="shrunk"` export',
        make=load_shrunk_as_pruned,
        raises=ValueError,
        problem=r"is a shrunk model",
        fix=r"use load_shrunk\(path, model_factory_or_instance\)",
        says="ValueError: 'model.shrunk.pt' is a shrunk model: use load_shrunk(path, model_factory_or_instance)",
        todo="Use `load_shrunk(path, Model)`: a shrunk model has other shapes than the original class.",
    ),
    # ------------------------------------------------------------ data
    Case(
        id="data-mnist-corrupted-file",
        did='`MNISTDataModule(data_dir="data")` with a damaged file in `data/MNIST/raw`',
        make=mnist_corrupted,
        raises=ChecksumError,
        problem=r"train-images-idx3-ubyte is corrupted or not the expected file: md5 \w+, expected \w+",
        fix=r"Delete it \(rm '.*'\) and run prepare_data\(\) again",
        says="ChecksumError: data/MNIST/raw/train-images-idx3-ubyte is corrupted or not the expected file",
        todo="Delete the file named and run again: it is fetched afresh and verified.",
    ),
    Case(
        id="data-mnist-missing-no-download",
        did='`MNISTDataModule(data_dir="offline", download=False)` with nothing in `offline`',
        make=lambda tmp: MNISTDataModule(data_dir=str(tmp / "offline"), download=False).prepare_data,
        raises=RuntimeError,
        problem=r"MNIST: 4 file\(s\) missing and download=False",
        fix=r"pass download=True or fetch them manually",
        says="DataUnavailableError: MNIST: 4 file(s) missing and download=False.",
        todo="Allow the download, or put the four uncompressed IDX files in `<data_dir>/MNIST/raw`.",
    ),
    Case(
        id="data-mnist-data-dir-is-a-file",
        did='`MNISTDataModule(data_dir="data")` where `data` is a file, not a folder',
        make=mnist_data_dir_is_a_file,
        raises=OSError,
        problem=r"data_dir",
        fix=r"(pass|give|use) (another|a different|a writable) data_dir|data_dir .{0,40}must be",
        says="NotADirectoryError: [Errno 20] MNIST: cannot create 'data/MNIST/raw' (Not a directory): data_dir 'data' "
        "must be a folder you can write to; pass another data_dir.",
        todo="Point `data_dir` at a folder you can write to (it is created if missing).",
    ),
    Case(
        id="data-mnist-max-shift-out-of-range",
        did="`MNISTDataModule(max_shift=28)` (a shift as large as the image)",
        make=call(MNISTDataModule, max_shift=28),
        raises=ValueError,
        problem=r"max_shift must be an integer number of pixels in \[0, 28\)",
        fix=r"0 disables the random translation",
        says="ValueError: max_shift must be an integer number of pixels in [0, 28) (0 disables the random "
        "translation), got 28",
        todo="Give a small shift (1-2 pixels is the usual MNIST augmentation), or 0 for none.",
    ),
    Case(
        id="data-cifar-missing-no-synthetic",
        did='`CIFAR10DataModule(data_dir="offline", download=False)` without the data',
        make=lambda tmp: CIFAR10DataModule(data_dir=str(tmp / "offline"), download=False).prepare_data,
        raises=RuntimeError,
        problem=r"CIFAR10 is not available: files missing or corrupted and download=False",
        fix=r"Put the extracted 'cifar-10-batches-py' folder at .* or pass synthetic=True",
        says="DataUnavailableError: CIFAR10 is not available: files missing or corrupted and download=False.",
        todo="Extract the archive into `data_dir`, or `synthetic=True` for a smoke test on random images.",
    ),
    # ------------------------------------------------------------ accounting
    Case(
        id="report-not-a-checkpoint",
        did='`sparsity_report("notes.txt")`: a path that is not a checkpoint',
        make=report_not_a_checkpoint,
        raises=ValueError,
        problem=r"notes\.txt.{0,80}(not a|cannot|could not|failed).{0,80}checkpoint",
        fix=r"\.ckpt|pass the model",
        says="ValueError: 'notes.txt' is not a checkpoint torch.load(weights_only=True) can read",
        todo="Pass the `.ckpt` file the Trainer wrote (`<log dir>/checkpoints/`), or the model itself.",
    ),
    Case(
        id="report-other-architecture",
        did='`sparsity_report("run.ckpt", model_class=OtherModel)`: not the class the checkpoint was trained with',
        make=report_other_architecture,
        raises=ValueError,
        problem=r"(does not match|mismatch).*head\.bias",
        fix=r"(class|model).{0,60}(trained with|wrote the checkpoint)",
        says="ValueError: The checkpoint does not match SevenWayMLP: shape mismatch: 'head.bias'",
        todo="Pass the class the checkpoint was trained with, or `model_class=None` for counts without FLOPs.",
    ),
    # ------------------------------------------------------------ command line and config
    Case(
        id="cli-export-missing-checkpoint",
        did="`lightning-scl export runs/last.ckpt` where that file does not exist",
        make=cli("export", "{tmp}/runs/last.ckpt"),
        raises=CLIExit,
        problem=r"^exit status 2: lightning-scl export: error: checkpoint 'runs/last\.ckpt' does not exist",
        fix=r"checkpoints/|dirpath|ls ",
        says="exit status 2: lightning-scl export: error: checkpoint 'runs/last.ckpt' does not exist: give the .ckpt "
        "file the run wrote",
        todo="Give the `.ckpt` file the run wrote: `ModelCheckpoint`'s `dirpath`, by default `<log dir>/checkpoints/`.",
    ),
    Case(
        id="cli-report-missing-checkpoint",
        did="`lightning-scl report runs/last.ckpt` where that file does not exist",
        make=cli("report", "{tmp}/runs/last.ckpt"),
        raises=CLIExit,
        problem=r"^exit status 2: lightning-scl report: error: checkpoint 'runs/last\.ckpt' does not exist",
        fix=r"checkpoints/|dirpath|ls ",
        says="exit status 2: lightning-scl report: error: checkpoint 'runs/last.ckpt' does not exist: give the .ckpt "
        "file the run wrote",
        todo="As for `export`: give the `.ckpt` file the run wrote.",
    ),
    Case(
        id="cli-export-other-class",
        did="`lightning-scl export run.ckpt -f shrunk` on a checkpoint of your own LightningModule (default "
        "`--model-class`)",
        make=cli_export_other_class,
        raises=CLIExit,
        problem=r"^exit status 2: .*Could not instantiate ImageClassifier with the checkpoint's hyper_parameters",
        fix=r"Set --model-class",
        says="exit status 2: lightning-scl export: error: export failed: Could not instantiate ImageClassifier",
        todo="Add `--model-class my_pkg.MyModule` (the class trained, importable from the working directory).",
    ),
    Case(
        id="cli-export-unknown-format",
        did="`lightning-scl export run.ckpt --format zip`",
        make=cli("export", "{tmp}/run.ckpt", "--format", "zip"),
        raises=CLIExit,
        problem=r"^exit status 2: .*argument --format/-f: invalid choice: 'zip'",
        fix=r"choose from 'safetensors', .*'onnx'",
        says="lightning-scl export: error: argument --format/-f: invalid choice: 'zip'",
        todo="Use one of the listed formats (`lightning-scl export --help` describes each).",
    ),
    Case(
        id="cli-fit-missing-recipe",
        did="`lightning-scl fit --config recipes/mnist.yaml`: no such file",
        make=cli("fit", "--config", "{tmp}/recipes/mnist.yaml"),
        raises=CLIExit,
        problem=r"^exit status 2: .*recipe 'recipes/mnist\.yaml' does not exist",
        fix=r"examples/recipes",
        says="lightning-scl fit: error: recipe 'recipes/mnist.yaml' does not exist; the recipes ship in "
        "examples/recipes/",
        todo="The recipes ship in `examples/recipes/` (e.g. `examples/recipes/mnist_lenet300_scl.yaml`); run from "
        "the repository root or give the full path.",
    ),
    Case(
        id="cli-callback-option-typo",
        did="`lightning-scl fit ... --trainer.callbacks.init_args.lamb=0.1` (a typo of `lam`)",
        make=cli(
            "fit",
            "--data=lightning_scl.data.MNISTDataModule",
            "--trainer.callbacks+=lightning_scl.callbacks.scl.SparseConnectivityLearning",
            "--trainer.callbacks.init_args.lamb=0.1",
            "--print_config",
        ),
        raises=CLIExit,
        problem=r"^exit status 2: .*Option 'lamb' is not accepted",
        fix=r"--trainer\.callbacks\.help|accepted options?:.*\blam\b",
        says="Option 'lamb' is not accepted",
        todo="List the callback's options: `lightning-scl fit --trainer.callbacks.help SparseConnectivityLearning`.",
    ),
    Case(
        id="config-callback-bad-value",
        did="a YAML config with `target_density: 2.0` under the SCL callback's `init_args`; `lightning-scl fit`",
        make=cli_config_bad_value,
        raises=CLIExit,
        problem=r"target_density must be in \(0, 1\] .*got 2\.0",
        fix=r"in \(0, 1\] \(fraction of connections kept\)",
        says="lightning-scl fit: error: SparseConnectivityLearning: target_density must be in (0, 1] (fraction of "
        "connections kept), got 2.0",
        todo="Give a fraction of connections to keep: `target_density: 0.02` for 2%.",
    ),
]


# ---------------------------------------------------------------------------------------------------- the test


_FLAGS = re.DOTALL | re.MULTILINE  # '^'/'$' at line ends, '.' across lines (usage text precedes CLI errors)


def shown(err: BaseException, tmp_path: Path) -> str:
    """What the user sees, ``"<Type>: <message>"``, with the run's folder dropped from paths."""
    text = f"exit status {err.status}: {err.stderr}" if isinstance(err, CLIExit) else f"{type(err).__name__}: {err}"
    return text.replace(f"{tmp_path}{os.sep}", "").replace(str(tmp_path), ".")


def _param(case: Case) -> Any:
    marks = [pytest.mark.xfail(strict=True, raises=MessageGap, reason=case.gap)] if case.gap else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input_names_problem_and_fix(case: Case, tmp_path: Path) -> None:
    trigger = case.make(tmp_path)  # preparation errors are real failures
    try:
        trigger()
    except Exception as caught:
        err = caught
    else:
        pytest.fail(f"{case.did}: raised nothing")
    text = shown(err, tmp_path)
    gaps = []
    if not isinstance(err, case.raises):
        gaps.append(f"raises {type(err).__name__}, want {case.raises.__name__}")
    if not re.search(case.problem, text, _FLAGS):
        gaps.append(f"the PROBLEM ({case.problem!r}) is not named")
    if not re.search(case.fix, text, _FLAGS):
        gaps.append(f"the FIX ({case.fix!r}) is not given")
    # the docs quote this excerpt: it must be what users see, gap or not
    assert " ".join(case.says.split()) in " ".join(text.split()), f"the docs' excerpt is stale; the error is:\n{text}"
    if gaps:
        raise MessageGap("; ".join(gaps) + f"\n--- the error:\n{text}")


def test_table_is_well_formed() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), "duplicate ids"
    assert len(CASES) >= 20
    for case in CASES:
        assert case.gap is None or case.gap.strip(), case.id
        for pattern in (case.problem, case.fix):
            re.compile(pattern)


def test_troubleshooting_table_is_current() -> None:
    assert TABLE.is_file(), f"{TABLE.relative_to(ROOT)} is missing: run {RENDER_COMMAND}"
    assert TABLE.read_text(encoding="utf-8") == render(), f"the table is stale: run {RENDER_COMMAND}"


# ---------------------------------------------------------------------------------------------------- rendering


def _cell(text: str) -> str:
    if "|" in text or "\n" in text:
        raise ValueError(f"a table cell cannot hold '|' or a newline: {text!r}")
    return text


def _code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def render() -> str:
    """The troubleshooting table: what you did, the error you see, what to do."""
    lines = [
        f"<!-- Generated from CASES in tests/test_bad_inputs.py by `{RENDER_COMMAND}`: edit the rows there. -->",
        "",
        "| What you did | Error | What to do |",
        "| --- | --- | --- |",
    ]
    for case in CASES:
        lines.append(f"| {_cell(case.did)} | {_cell(_code(case.says))} | {_cell(case.todo)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Render the bad-input table as Markdown.")
    parser.add_argument("--render", metavar="PATH", required=True, help="file to write (e.g. " + str(TABLE) + ")")
    args = parser.parse_args()
    Path(args.render).write_text(render(), encoding="utf-8")
    print(f"wrote {args.render} ({len(CASES)} rows)", file=sys.stderr)
