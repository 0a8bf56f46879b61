"""What a learned sparse fully connected network is built of: units in use, fan-in, inputs read, wasted connections.

Reads a state dict saved by ``mnist_pruning.py --save-model`` (an SCL run on a fully connected model such as
LeNet-300-100) and walks its masked Linear layers in order. A hidden unit is *in use* when it has at least one kept
input connection and one kept output connection. A kept connection that leaves a unit with no inputs carries only
``activation(bias)``, a constant: it spends budget on what the next layer's bias could hold.

Usage::

    python benchmarks/mnist_pruning.py --model lenet300 --method scl --density 0.015 --epochs 20 --seeds 0 \\
        --threads 1 --tag probe --save-model scl_lenet300.pt --out probe.jsonl
    python benchmarks/mask_structure.py scl_lenet300.pt --out benchmarks/results/mask_structure_lenet300.md
    python benchmarks/mask_structure.py --smoke     # CI: a random two-layer mask, writes nothing
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

MASK_SUFFIX = ".parametrizations.weight.0.mask"


def gates(state_dict: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """``(layer, H(m))`` for every masked 2-d (Linear) weight, in state-dict order (the forward order here)."""
    out = [(key[: -len(MASK_SUFFIX)], value > 0) for key, value in state_dict.items() if key.endswith(MASK_SUFFIX)]
    if not out or any(g.dim() != 2 for _, g in out):
        raise SystemExit("expected a state dict of an SCL-masked fully connected network (2-d weight masks)")
    return out


def structure(layers: list[tuple[str, torch.Tensor]]) -> str:
    """A markdown table: per layer, kept connections, units with inputs / outputs / both, and the median fan-in."""
    lines = [
        "| layer | kept connections | inputs read | units | with inputs | with outputs | in use | median fan-in "
        "(units in use) | kept connections leaving input-less units |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    total = sum(int(g.sum()) for _, g in layers)
    wasted_total = 0
    for index, (name, gate) in enumerate(layers):
        has_inputs = gate.any(dim=1)
        inputs_read = int(gate.any(dim=0).sum())
        if index + 1 < len(layers):
            has_outputs = layers[index + 1][1].any(dim=0)
            # connections the next layer takes from this layer's input-less units
            wasted = int(layers[index + 1][1][:, ~has_inputs].sum())
        else:
            has_outputs = torch.ones_like(has_inputs)  # the output layer's units are the logits
            wasted = 0
        wasted_total += wasted
        in_use = has_inputs & has_outputs
        fan_in = gate[in_use].sum(dim=1).tolist()
        lines.append(
            f"| {name} | {int(gate.sum()):,} | {inputs_read} of {gate.shape[1]} | {gate.shape[0]} | "
            f"{int(has_inputs.sum())} | {int(has_outputs.sum())} | {int(in_use.sum())} | "
            f"{statistics.median(fan_in) if fan_in else 0:g} | {wasted} |"
        )
    share = 100 * wasted_total / max(total, 1)
    return (
        "\n".join(lines)
        + f"\n\n{total:,} connections kept; {wasted_total} ({share:.1f}%) leave units that have no inputs.\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("state_dict", type=Path, nargs="?", help="a state dict from mnist_pruning.py --save-model")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        torch.manual_seed(0)
        state = {f"net.{i}{MASK_SUFFIX}": torch.randn(shape) - 1 for i, shape in enumerate([(8, 12), (4, 8)])}
        print(structure(gates(state)))
        return
    if args.state_dict is None:
        parser.error("give the state dict to read (or --smoke)")
    table = structure(gates(torch.load(args.state_dict, weights_only=True)))
    print(table)
    if args.out is not None:
        args.out.write_text(f"From `{args.state_dict.name}`.\n\n{table}")


if __name__ == "__main__":
    main(sys.argv[1:])
