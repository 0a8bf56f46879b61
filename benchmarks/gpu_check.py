"""GPU path check: SCL under bf16-mixed, fp16 with GradScaler, torch.compile (inductor) and FSDP, and its step time.

One command, because GPU time comes in short windows::

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json

Every feature trains ResNet-20 (CIFAR shape, batch 128, random data) through a real ``Trainer`` and prints one
``PASS``/``FAIL`` line with what it measured; the JSON file is rewritten after each feature, so whatever finished
comes back even if a later feature hangs. Every training fit also audits, before each step, that each mask's cached
0/1 gate equals ``mask > 0`` (the accelerator's optimizer path must bump the masks' version counters).

- ``bf16-mixed``: masks stay float32, losses finite, masks move, density falls.
- ``16-mixed``: the real fp16 ``GradScaler``: steps it skips for inf/NaN gradients are counted next to the
  callback's own non-finite skips; masks and ``lam`` stay finite.
- ``torch.compile``: the LightningModule compiled as users do (``torch.compile(model)``, inductor) against two eager
  runs (their difference is the noise floor); then the compiled run's masks export (safetensors and shrunk) and the
  exports reproduce its outputs.
- ``fsdp``: Lightning's FSDP strategy on one device, then ``trainer.save_checkpoint`` and an export from that file.
- ``step time``: per optimizer step, median over rounds of interleaved fits (dense, SCL training its masks, SCL with
  frozen masks, ModelPruning-style ``torch.nn.utils.prune`` masks), for ResNet-20 and LeNet-5-Caffe; plus SCL's own
  hooks per step. The target is SCL <= 1.10x dense.

``--accelerator cpu`` runs the same checks on the CPU (a dry run of the script: slow, and FSDP needs CUDA);
``--smoke`` (CI) runs the bf16, fp16 and step-time checks on the CPU for 2-3 steps, to keep the script working.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as L
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from step_time import METHODS, SHAPES, HookBracket, install_method

from lightning_scl.callbacks.scl import SparseConnectivityLearning
from lightning_scl.export import export_pruned, load_shrunk
from lightning_scl.masking import eager_forward
from lightning_scl.models import ImageClassifier


def _data(model_name: str, steps: int, batch_size: int = 128) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    n = steps * batch_size
    x, y = torch.randn(n, *SHAPES[model_name], generator=g), torch.randint(0, 10, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size)


class Audit(L.Callback):
    """Keeps every step's loss and checks, before each step, every mask's cached gate against ``mask > 0``."""

    def __init__(self, scl: SparseConnectivityLearning | None):
        self.scl, self.losses, self.gate_checks, self.gate_mismatches = scl, [], 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for mask in self.scl.masks.values() if self.scl is not None else ():
            cached = mask.gate_values(torch.float32)
            self.gate_checks += 1
            self.gate_mismatches += int(not torch.equal(cached, (mask.mask.detach() > 0).to(torch.float32)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


class ScalerWatch(L.Callback):
    """Counts the optimizer steps fp16's GradScaler skipped (its scale falls after each) and, on those steps, whether
    any mask changed anyway."""

    def __init__(self, scl: SparseConnectivityLearning):
        self.scl, self.skipped, self.masks_moved_on_skipped, self._scale, self._before = scl, 0, 0, None, None

    def _masks(self) -> torch.Tensor:
        return torch.cat([m.mask.detach().reshape(-1) for m in self.scl.masks.values()])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = self._masks().clone()
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # None: fp16 autocast without one (on the CPU)
        self._scale = None if scaler is None else float(scaler.get_scale())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._scale is not None and float(trainer.precision_plugin.scaler.get_scale()) < self._scale:
            self.skipped += 1
            self.masks_moved_on_skipped += int(not torch.equal(self._masks(), self._before))


class StepTimer(L.Callback):
    """First and last callback of a fit: wall time per step (accelerator synchronized), from step ``skip`` on."""

    def __init__(self, sync: Callable[[], None], skip: int, stop: StepTimer | None = None):
        self.sync, self.skip, self.stop, self.times, self.start = sync, skip, stop, [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.stop is not None:
            self.sync()
            self.stop.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.stop is None:
            self.sync()
            if batch_idx >= self.skip:
                self.times.append(time.perf_counter() - self.start)


def _fit(
    args: argparse.Namespace,
    scl: SparseConnectivityLearning | None,
    steps: int,
    compile_model: bool = False,
    extra_callbacks: list[L.Callback] | None = None,
    **trainer_kwargs,
) -> tuple[L.Trainer, L.LightningModule, Audit]:
    torch.manual_seed(0)
    model = ImageClassifier("resnet20", lr=0.05)
    audit = Audit(scl)
    callbacks = [c for c in (scl, audit, *(extra_callbacks or [])) if c is not None]
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    target = torch.compile(model, backend=args.compile_backend) if compile_model else model
    trainer.fit(target, _data("resnet20", steps))
    return trainer, model, audit


def _mask_summary(scl: SparseConnectivityLearning, audit: Audit) -> dict:
    masks = [m.mask.detach() for m in scl.masks.values()]
    return {
        "steps": len(audit.losses),
        "density": round(scl.density, 5),
        "mask_dtypes": sorted({str(m.dtype) for m in masks}),
        "masks_finite": all(bool(torch.isfinite(m).all()) for m in masks),
        "masks_moved": any(bool((m != 1.0).any()) for m in masks),  # the default mask_init
        "losses_finite": all(math.isfinite(x) for x in audit.losses),
        "lam": scl.lam,
        "gate_checks": audit.gate_checks,
        "gate_mismatches": audit.gate_mismatches,
    }


def _healthy(info: dict) -> bool:
    return (
        info["masks_finite"]
        and info["masks_moved"]
        and info["losses_finite"]
        and info["density"] < 1.0
        and math.isfinite(info["lam"])
        and info["gate_checks"] > 0
        and info["gate_mismatches"] == 0
    )


def check_bf16(args) -> dict:
    scl = SparseConnectivityLearning(lam=0.2, mask_lr=0.05)
    _, _, audit = _fit(args, scl, args.steps, precision="bf16-mixed")
    info = _mask_summary(scl, audit)
    return {"ok": _healthy(info) and info["mask_dtypes"] == ["torch.float32"], **info}


def check_fp16(args) -> dict:
    from lightning.pytorch.plugins.precision import MixedPrecision

    scl = SparseConnectivityLearning(lam=0.2, mask_lr=0.05)
    watch = ScalerWatch(scl)
    plugins = []
    if args.accelerator == "gpu":  # a loss scale far too large: the first steps overflow and are skipped
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**24)
        plugins = [MixedPrecision("16-mixed", "cuda", scaler=scaler)]
    precision = None if plugins else "16-mixed"
    _, _, audit = _fit(args, scl, 2 * args.steps, extra_callbacks=[watch], plugins=plugins, precision=precision)
    info = _mask_summary(scl, audit)
    info |= {
        "scaler_skipped_steps": watch.skipped,
        "scl_skipped_nonfinite": scl.steps_skipped_nonfinite,
        "masks_moved_on_skipped_steps": watch.masks_moved_on_skipped,
    }
    consistent = watch.masks_moved_on_skipped == 0 and scl.steps_skipped_nonfinite == watch.skipped
    return {"ok": _healthy(info) and consistent and (watch.skipped > 0 or args.accelerator == "cpu"), **info}


def check_compile(args) -> dict:
    runs = {}
    for name, compiled in (("eager_a", False), ("eager_b", False), ("compiled", True)):
        scl = SparseConnectivityLearning(lam=0.2, mask_lr=0.05)
        start = time.perf_counter()
        _, model, audit = _fit(args, scl, args.compile_steps, compile_model=compiled)
        runs[name] = (model, scl, audit, time.perf_counter() - start)
    torch._dynamo.reset()

    def max_rel(a: list[float], b: list[float]) -> float:
        return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))

    eager_losses = runs["eager_a"][2].losses
    noise = max_rel(runs["eager_b"][2].losses, eager_losses)
    diff = max_rel(runs["compiled"][2].losses, eager_losses)
    first = max_rel(runs["compiled"][2].losses[:1], eager_losses[:1])  # same weights and masks: numerics only
    model, scl, audit, _ = runs["compiled"]
    info = _mask_summary(scl, audit)
    info |= {
        "first_loss_rel_diff_compiled_vs_eager": first,
        "loss_max_rel_diff_compiled_vs_eager": diff,
        "loss_max_rel_diff_eager_vs_eager": noise,
        "density_eager": round(runs["eager_a"][1].density, 5),
        "fit_seconds": {k: round(v[3], 1) for k, v in runs.items()},
    }
    # The compiled run's masks export, and the exports compute what the compiled model computes.
    device = next(model.parameters()).device
    x = torch.randn(16, *SHAPES["resnet20"], device=device)
    model.eval()
    with torch.no_grad(), eager_forward(model):  # exports run eagerly; compiling the eval forward costs minutes
        reference = model(x)
        with tempfile.TemporaryDirectory() as tmp:
            plain = ImageClassifier("resnet20").to(device).eval()
            plain.load_state_dict(load_file(export_pruned(model, f"{tmp}/m.safetensors"), device=str(device)))
            shrunk = load_shrunk(export_pruned(model, f"{tmp}/m.shrunk.pt", format="shrunk"), ImageClassifier)
            shrunk = shrunk.to(device).eval()
            info["export_max_abs_diff"] = {
                "safetensors": float((plain(x) - reference).abs().max()),
                "shrunk": float((shrunk(x) - reference).abs().max()),
            }
    exports_ok = all(v < 1e-3 for v in info["export_max_abs_diff"].values())
    ok = _healthy(info) and first <= 1e-3 and diff <= max(1e-2, 10 * noise) and exports_ok
    return {"ok": ok, **info}


def check_fsdp(args) -> dict:
    from lightning.pytorch.strategies import FSDPStrategy

    scl = SparseConnectivityLearning(lam=0.2, mask_lr=0.05)
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lightning_scl.models import _BasicBlock

    # the user's policy wraps each residual block; the callback adds a unit per mask
    strategy = FSDPStrategy(auto_wrap_policy={_BasicBlock})
    trainer, model, audit = _fit(args, scl, args.steps, strategy=strategy)
    info = _mask_summary(scl, audit)
    units = [type(m.module).__name__ for m in model.modules() if isinstance(m, FullyShardedDataParallel)]
    info["fsdp_units"] = {name: units.count(name) for name in sorted(set(units))}
    with tempfile.TemporaryDirectory() as tmp:
        trainer.save_checkpoint(f"{tmp}/fsdp.ckpt")
        saved = torch.load(f"{tmp}/fsdp.ckpt", map_location="cpu", weights_only=False)
        saved_masks = {k: v for k, v in saved["state_dict"].items() if k.endswith(".mask")}
        info["checkpoint_masks"] = len(saved_masks)
        info["checkpoint_masks_match"] = all(
            torch.equal(saved_masks[f"{name}.parametrizations.weight.0.mask"], mask.mask.detach().cpu())
            for name, mask in scl.masks.items()
        )
        exported = export_pruned(f"{tmp}/fsdp.ckpt", f"{tmp}/fsdp.safetensors", model_class=ImageClassifier)
        info["export_from_checkpoint_bytes"] = exported.stat().st_size
    ok = _healthy(info) and info["steps"] == args.steps and info["checkpoint_masks_match"]
    return {"ok": ok and info["fsdp_units"].get("ConnectivityMask") == len(scl.masks), **info}


# "scl_per_layer": SCL training its masks with the per-layer mask step that CPUs use, against the batched one that
# "scl" takes on a GPU (the same run, so the batching's gain is measured on one machine)
TIMED = (*METHODS, "scl_per_layer")


def check_step_time(args) -> dict:
    sync = torch.cuda.synchronize if args.accelerator == "gpu" else (lambda: None)
    result: dict = {}
    for model_name in args.time_models:
        times: dict[str, list[float]] = {m: [] for m in TIMED}
        hooks: dict[str, list[float]] = {"scl": [], "scl_frozen": [], "scl_per_layer": []}
        data = _data(model_name, args.time_steps)
        # The last round only times SCL's own hooks: their synchronizations would slow the steps timed before.
        for round_ in range(args.rounds + 1):
            hook_round = round_ == args.rounds
            shift = round_ % len(TIMED)
            for method in TIMED[shift:] + TIMED[:shift]:
                if hook_round and method not in hooks:
                    continue
                torch.manual_seed(0)
                model = ImageClassifier(model_name, lr=0.05, weight_decay=5e-4)
                scl = install_method(model, "scl" if method == "scl_per_layer" else method)
                if method == "scl_per_layer":
                    scl._force_batched_step = False
                stop = StepTimer(sync, skip=args.time_warmup)
                closing = HookBracket(sync=sync) if hook_round else None
                inner = [HookBracket(closing, sync=sync), scl, closing] if hook_round else [scl]
                with tempfile.TemporaryDirectory() as log_dir:  # a real logger, as in use
                    trainer = L.Trainer(
                        accelerator=args.accelerator,
                        devices=1,
                        max_steps=args.time_steps,
                        callbacks=[StepTimer(sync, args.time_warmup, stop), *(c for c in inner if c), stop],
                        logger=L.loggers.CSVLogger(log_dir, name="gpu_step_time"),
                        log_every_n_steps=50,
                        enable_checkpointing=False,
                        enable_progress_bar=False,
                        enable_model_summary=False,
                    )
                    trainer.fit(model, data)
                if hook_round:
                    hooks[method] += closing.times[args.time_warmup :]
                else:
                    times[method] += stop.times
        dense = statistics.median(times["dense"])
        result[model_name] = {
            method: {"median_ms": round(1000 * statistics.median(t), 3), "ratio_to_dense": statistics.median(t) / dense}
            for method, t in times.items()
        }
        for method, t in hooks.items():
            result[model_name][method]["scl_hooks_median_ms"] = round(1000 * statistics.median(t), 3)
        default = 0.7 * statistics.median(times["scl"]) + 0.3 * statistics.median(times["scl_frozen"])
        result[model_name]["default_run_ratio"] = default / dense
    ok = all(r["default_run_ratio"] <= 1.10 for r in result.values())
    return {"ok": ok, "batch_size": 128, "timed_steps_per_fit": args.time_steps - args.time_warmup, **result}


def run_check(name: str, fn: Callable[[argparse.Namespace], dict], args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    try:
        detail = fn(args)
        ok = bool(detail.pop("ok"))
        result = {"feature": name, "status": "PASS" if ok else "FAIL", **detail}
    except Exception as err:  # report every feature, whatever breaks
        result = {
            "feature": name,
            "status": "FAIL",
            "error": f"{type(err).__name__}: {err}"[:2000],
            "trace": traceback.format_exc()[-3000:],
        }
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _figures(result: dict) -> str:
    """The few numbers that say what a feature check found, for the table (older result files lack some)."""
    if "error" in result:
        return f"error: {result['error'][:160]}"

    def number(key: str, spec: str) -> str:
        return "not measured" if result.get(key) is None else format(result[key], spec)

    name, parts = result["feature"], []
    if "density" in result:
        parts.append(f"density {100 * result['density']:.1f}% after {result['steps']} steps")
        parts.append(f"gate audits {result['gate_checks']}, mismatches {result['gate_mismatches']}")
    if name == "16-mixed":
        parts.append(
            f"GradScaler skipped {result['scaler_skipped_steps']} steps, SCL skipped {result['scl_skipped_nonfinite']}"
            f", masks moved on skipped steps: {number('masks_moved_on_skipped_steps', 'd')}"
        )
    if name == "fsdp":
        parts.append(f"FSDP units {result['fsdp_units']}, checkpoint masks equal: {result['checkpoint_masks_match']}")
    if name == "torch.compile":
        exports = result.get("export_max_abs_diff") or {}
        parts += [
            f"first loss vs eager {number('first_loss_rel_diff_compiled_vs_eager', '.1e')} (relative)",
            f"later steps {number('loss_max_rel_diff_compiled_vs_eager', '.3f')}"
            f" (eager vs eager {number('loss_max_rel_diff_eager_vs_eager', '.3f')})",
            f"export max abs diff {max(exports.values()):.1e}" if exports else "exports not checked",
        ]
    if name == "step time":
        ratios = {
            m: r["default_run_ratio"] for m, r in result.items() if isinstance(r, dict) and "default_run_ratio" in r
        }
        parts.append(", ".join(f"{m}: default run {ratio:.2f}x dense" for m, ratio in ratios.items()))
    return "; ".join(parts)


def render_markdown(report: dict) -> str:
    meta, results = report["meta"], report["results"]
    lines = [
        f"Device: {meta['device']}, torch {meta['torch']}, lightning {meta['lightning']}. Command: `{meta['command']}`",
        "",
        "| feature | result | measured |",
        "|---|---|---|",
    ]
    lines += [f"| {r['feature']} | {r['status']} | {_figures(r)} |" for r in results]
    timing = next((r for r in results if r["feature"] == "step time" and "error" not in r), None)
    if timing:
        lines += [
            "",
            f"Step time, batch {timing['batch_size']}, median of {timing['timed_steps_per_fit']} timed steps per fit "
            "over interleaved fits:",
            "",
            "| model | method | median ms | / dense | SCL's hooks, ms |",
            "|---|---|---:|---:|---:|",
        ]
        for model, methods in timing.items():
            if not isinstance(methods, dict) or "dense" not in methods:
                continue
            for method in [m for m in TIMED if m in methods]:
                row = methods[method]
                hooks = row.get("scl_hooks_median_ms")
                lines.append(
                    f"| {model} | {method} | {row['median_ms']:.2f} | {row['ratio_to_dense']:.2f}x | "
                    f"{'' if hooks is None else f'{hooks:.2f}'} |"
                )
            lines.append(f"| {model} | default run (0.7 scl + 0.3 frozen) | | {methods['default_run_ratio']:.2f}x | |")
    return "\n".join(lines) + "\n"


CHECKS = {
    "bf16-mixed": check_bf16,
    "16-mixed": check_fp16,
    "fsdp": check_fsdp,
    "step time": check_step_time,
    "torch.compile": check_compile,  # last: inductor's compilation is the slowest part
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--accelerator", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), default=list(CHECKS))
    parser.add_argument("--steps", type=int, default=16, help="steps of the feature fits")
    parser.add_argument("--compile-steps", type=int, default=8)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--time-models", nargs="+", default=["resnet20", "lenet5"], choices=sorted(SHAPES))
    parser.add_argument("--time-steps", type=int, default=50, help="steps per timed fit")
    parser.add_argument("--time-warmup", type=int, default=10, help="untimed first steps of each timed fit")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of interleaved timed fits")
    parser.add_argument("--render", type=Path, default=None, help="only write the Markdown table of a result JSON")
    parser.add_argument("--require-gpu", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CI without GPU: a few CPU steps of the quick checks")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.render:
        args.render.with_suffix(".md").write_text(render_markdown(json.loads(args.render.read_text())))
        return 0
    if args.smoke:  # the script's own logic, on the CPU, in seconds (FSDP needs CUDA; compile takes a minute)
        args.accelerator, args.only, args.steps, args.rounds = "cpu", ["bf16-mixed", "16-mixed", "step time"], 2, 1
        args.time_models, args.time_steps, args.time_warmup = ["lenet5"], 3, 1
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        for feature in args.only:
            print(f"SKIPPED  {feature}: no CUDA device")
        return 1 if args.require_gpu else 0
    meta = {
        "device": torch.cuda.get_device_name(0) if args.accelerator == "gpu" else "cpu",
        "torch": torch.__version__,
        "lightning": L.__version__,
        "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print(json.dumps(meta), flush=True)
    results = []
    for name in args.only:
        result = run_check(name, CHECKS[name], args)
        results.append(result)
        extra = {k: v for k, v in result.items() if k not in ("feature", "status", "trace")}
        print(f"{result['status']:<5} {name}: {json.dumps(extra)}", flush=True)
        if "trace" in result:
            print(result["trace"], flush=True)
        if args.out:
            report = {"meta": meta, "results": results}
            args.out.write_text(json.dumps(report, indent=2) + "\n")
            args.out.with_suffix(".md").write_text(render_markdown(report))
    if args.smoke:  # the timings of 2 steps say nothing: only that every check ran
        return 0 if all("error" not in r for r in results) else 1
    return 0 if all(r["status"] == "PASS" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
