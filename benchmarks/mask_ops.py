"""The elementwise operations of one SCL step, each written two ways: a previous (or obvious) form and the library's.

The mask's forward (``W * H(m)``), the weight gradient (``g * H(m)``) and restoring the protected weights after the
optimizer step each touch every masked weight once per step. Written with a bool gate they go through ``where``;
written with a 0/1 gate in the weight's dtype (``lightning_scl.masking.gate_values``) they are plain products and
``lerp``. The mask update touches every mask variable a few more times: counting the kept connections (for the
density controller), each unit's gradient statistic and the scaling of the gradient by it. Those were written with a
bool count, one-read vector norms and one ``addcmul``; the library now uses a 0/1 float count, ``abs`` then a plain
reduction, and two in-place passes.

The script times both forms on the layer shapes of the benchmark networks, interleaved, and checks that they agree
(exactly, and in the forward the sign of every zero; to float rounding where the summation order differs). Tiny
tensors (the smoke shape) are dominated by per-call overhead, where the previous forms can win.

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
from typing import NamedTuple

import torch

from lightning_scl.masking import (
    _count_positive,
    _scale_rows_and_add_,
    gate_values,
    mask_gradient_statistic,
    masked_weight,
)

RESULTS = Path(__file__).parent / "results"
# LeNet-5-Caffe's large fully connected layer, a ResNet-20 stage-3 convolution, LeNet-300-100's first layer.
SHAPES = {"lenet5 fc 500x800": (500, 800), "resnet20 conv 64x64x3x3": (64, 64, 3, 3), "lenet300 fc 300x784": (300, 784)}


class Operation(NamedTuple):
    previous_form: str
    previous: Callable[[], torch.Tensor]
    library: Callable[[], torch.Tensor]
    exact: bool = True  # False: the two sum in different orders, so they agree to float rounding


def operations(shape: tuple[int, ...]) -> dict[str, Operation]:
    """For each per-step operation, its previous form and the library's, on fresh tensors of ``shape``."""
    weight, mask, grad, before = (torch.randn(shape) for _ in range(4))
    original, scaled = weight.clone(), grad.clone()
    bool_gate, float_gate = mask > 0, gate_values(mask, weight.dtype)  # the backward reuses the forward's gate
    rows = grad.reshape(shape[0], -1)
    row_scale = torch.rand(shape[0]).view(-1, *[1] * (len(shape) - 1))
    pressure = 0.1

    def restore_bool() -> torch.Tensor:
        original.copy_(weight)
        return torch.where(mask > 0, original, before, out=original)

    def restore_float() -> torch.Tensor:
        original.copy_(weight)
        return torch.lerp(before, original, gate_values(mask, original.dtype), out=original)

    def scale_addcmul() -> torch.Tensor:
        scaled.copy_(grad)
        return torch.addcmul(scaled.new_tensor(pressure), scaled, row_scale, out=scaled)

    def scale_library() -> torch.Tensor:
        scaled.copy_(grad)
        return _scale_rows_and_add_(scaled, row_scale.reshape(-1), 0, pressure)

    return {
        "forward W*H(m)": Operation(
            "bool gate, where",
            lambda: torch.where(mask > 0, weight, 0.0),
            lambda: masked_weight(weight, mask),  # the library's forward: 0 + W * gate, one pass
        ),
        "weight gradient g*H(m) (gate saved)": Operation(
            "bool gate, where", lambda: torch.where(bool_gate, grad, 0.0), lambda: grad * float_gate
        ),
        "restore protected weights (copy + restore)": Operation("bool gate, where", restore_bool, restore_float),
        "count kept connections": Operation("bool gate, sum", lambda: (mask > 0).sum(), lambda: _count_positive(mask)),
        "mean abs(g) per unit": Operation(
            "L1 vector norm",
            lambda: torch.linalg.vector_norm(rows, ord=1, dim=1) / rows.shape[1],
            lambda: mask_gradient_statistic(grad, 0, "mean_abs"),
            exact=False,
        ),
        "max abs(g) per unit": Operation(
            "max vector norm",
            lambda: torch.linalg.vector_norm(rows, ord=float("inf"), dim=1),
            lambda: mask_gradient_statistic(grad, 0, "max_abs"),
        ),
        "scale rows, add the pressure (copy + scale)": Operation(
            "one addcmul", scale_addcmul, scale_library, exact=False
        ),
    }


def time_pair(previous: Callable, library: Callable, rounds: int, reps: int) -> tuple[list[float], list[float]]:
    """Microseconds per call, median of ``reps`` calls, for ``rounds`` interleaved rounds of each version."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for index, op in enumerate((previous, library)):
            op()  # warm the allocator and caches
            calls = []
            for _ in range(reps):
                start = time.perf_counter()
                op()
                calls.append(time.perf_counter() - start)
            times[index].append(1e6 * statistics.median(calls))
    return times


def agree(name: str, op: Operation) -> bool:
    previous, library = op.previous(), op.library()
    if not op.exact:
        return torch.allclose(previous, library, rtol=1e-5, atol=1e-7)
    same_sign = name != "forward W*H(m)" or torch.equal(previous.signbit(), library.signbit())
    return torch.equal(previous, library) and same_sign


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
        for op_name, op in operations(shape).items():
            if not agree(op_name, op):
                raise SystemExit(f"{op_name} on {shape_name}: the two versions disagree")
            previous_us, library_us = time_pair(op.previous, op.library, args.rounds, args.reps)
            ratios = [p / q for p, q in zip(previous_us, library_us)]
            results.append(
                {
                    "shape": shape_name,
                    "operation": op_name,
                    "previous_form": op.previous_form,
                    "previous_us": statistics.median(previous_us),
                    "library_us": statistics.median(library_us),
                    "speedup_per_round": ratios,
                }
            )
    lines = [
        "| layer | operation | previous form | previous us | library us | speed-up: median (min-max over rounds) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in results:
        ratios = r["speedup_per_round"]
        lines.append(
            f"| {r['shape']} | {r['operation']} | {r['previous_form']} | {r['previous_us']:.0f} | "
            f"{r['library_us']:.0f} | {statistics.median(ratios):.1f}x ({min(ratios):.1f}-{max(ratios):.1f}) |"
        )
    print("\n".join(lines))
    if not args.smoke:
        header = (
            f"torch {torch.__version__}, {args.threads} threads, {args.rounds} interleaved rounds x {args.reps} "
            "calls; every pair checked to agree.\n\n"
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "threads": args.threads, "rounds": args.rounds, "reps": args.reps}
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        args.out.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
