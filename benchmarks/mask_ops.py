"""The elementwise operations of one SCL step, each written two ways: with a bool gate and with a 0/1 float gate.

The mask's forward (``W * H(m)``), the weight gradient (``g * H(m)``) and restoring the protected weights after the
optimizer step each touch every masked weight once per step. Written with a bool gate they go through ``where``;
written with a 0/1 gate in the weight's dtype (``lightning_scl.masking.gate_values``) they are plain products and
``lerp``. The two give the same values (``lerp`` with a 0/1 weight is exact). This script times them on the layer
shapes of the benchmark networks, interleaved, and checks that they agree (values, and in the forward the sign of
every zero). Tiny tensors (the smoke shape) are dominated by per-call overhead, where the bool versions can win.

Usage::

    python benchmarks/mask_ops.py            # idle machine; writes results/mask_ops.{md,json}
    python benchmarks/mask_ops.py --smoke    # CI: one small shape, few repetitions, writes nothing
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lightning_scl.masking import gate_values, masked_weight

RESULTS = Path(__file__).parent / "results"
# LeNet-5-Caffe's large fully connected layer, a ResNet-20 stage-3 convolution, LeNet-300-100's first layer.
SHAPES = {"lenet5 fc 500x800": (500, 800), "resnet20 conv 64x64x3x3": (64, 64, 3, 3), "lenet300 fc 300x784": (300, 784)}


def operations(shape: tuple[int, ...]) -> dict[str, tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]]:
    """For each per-step operation, (bool-gate version, float-gate version) on fresh tensors of ``shape``."""
    weight, mask, grad, before = (torch.randn(shape) for _ in range(4))
    original = weight.clone()
    bool_gate, float_gate = mask > 0, gate_values(mask, weight.dtype)  # the backward reuses the forward's gate

    def restore_bool() -> torch.Tensor:
        original.copy_(weight)
        return torch.where(mask > 0, original, before, out=original)

    def restore_float() -> torch.Tensor:
        original.copy_(weight)
        return torch.lerp(before, original, gate_values(mask, original.dtype), out=original)

    return {
        "forward W*H(m)": (
            lambda: torch.where(mask > 0, weight, 0.0),
            lambda: masked_weight(weight, mask),  # the library's forward: 0 + W * gate, one pass
        ),
        "weight gradient g*H(m) (gate saved)": (
            lambda: torch.where(bool_gate, grad, 0.0),
            lambda: grad * float_gate,
        ),
        "restore protected weights (copy + restore)": (restore_bool, restore_float),
    }


def time_pair(bool_op: Callable, float_op: Callable, rounds: int, reps: int) -> tuple[list[float], list[float]]:
    """Microseconds per call, median of ``reps`` calls, for ``rounds`` interleaved rounds of each version."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for index, op in enumerate((bool_op, float_op)):
            op()  # warm the allocator and caches
            calls = []
            for _ in range(reps):
                start = time.perf_counter()
                op()
                calls.append(time.perf_counter() - start)
            times[index].append(1e6 * statistics.median(calls))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", type=Path, default=RESULTS / "mask_ops.json")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    shapes = SHAPES
    if args.smoke:
        shapes, args.rounds, args.reps = {"smoke 20x30": (20, 30)}, 2, 3
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    for shape_name, shape in shapes.items():
        for op_name, (bool_op, float_op) in operations(shape).items():
            bool_out, float_out = bool_op(), float_op()
            same = torch.equal(bool_out, float_out) and (
                op_name != "forward W*H(m)" or torch.equal(bool_out.signbit(), float_out.signbit())
            )
            if not same:
                raise SystemExit(f"{op_name} on {shape_name}: the two versions disagree")
            bool_us, float_us = time_pair(bool_op, float_op, args.rounds, args.reps)
            ratios = [b / f for b, f in zip(bool_us, float_us)]
            results.append(
                {
                    "shape": shape_name,
                    "operation": op_name,
                    "bool_gate_us": statistics.median(bool_us),
                    "float_gate_us": statistics.median(float_us),
                    "speedup_per_round": ratios,
                }
            )
    lines = [
        "| layer | operation | bool gate us | 0/1 float gate us | speed-up: median (min-max over rounds) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results:
        ratios = r["speedup_per_round"]
        lines.append(
            f"| {r['shape']} | {r['operation']} | {r['bool_gate_us']:.0f} | {r['float_gate_us']:.0f} | "
            f"{statistics.median(ratios):.1f}x ({min(ratios):.1f}-{max(ratios):.1f}) |"
        )
    print("\n".join(lines))
    if not args.smoke:
        header = (
            f"torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds x {args.reps} "
            "calls; every pair checked equal.\n\n"
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds, "reps": args.reps}
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        args.out.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
