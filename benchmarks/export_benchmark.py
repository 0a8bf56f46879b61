"""Export benchmark: file sizes of the weight formats, and CPU latency of the shrunk model against the dense one.

- sizes: SYNTHETIC random per-connection masks at 10%, 2% and 0.5% density on LeNet-300-100 and LeNet-5-Caffe (file
  size depends only on the density, so no training is needed);
- latency, ``--masks trained`` (the default): channel masks LEARNED by
  ``SparseConnectivityLearning(granularity="channel")`` (connection-count regularizer) on MNIST: LeNet-5-Caffe on
  1x28x28 images, and a CIFAR ResNet-20 on MNIST padded to 32x32 and repeated to 3 channels (CIFAR-shaped input with a
  real learning signal: CIFAR cannot be downloaded here). The table gives the test accuracy of the masked model (the
  shrunk one computes the same function);
- latency, ``--masks synthetic``: in every dependency group (a layer's output channels together with the residual
  adds that tie them to other layers) the channels of largest summed L1 norm are kept; biases and BatchNorm
  statistics are randomized so that removed channels carry non-zero constants (the shrink must fold them).

Usage::

    python benchmarks/export_benchmark.py --part sizes          # no timing: safe on a busy machine
    python benchmarks/export_benchmark.py --part latency        # trains (minutes), then times: a quiet machine
    python benchmarks/export_benchmark.py --part latency --masks synthetic
    python benchmarks/export_benchmark.py --smoke               # CI: tiny, writes nothing unless --out is given

Results go to ``benchmarks/results/export_sizes.{md,json}`` and ``export_latency[_synthetic].{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from lightning_scl.callbacks.scl import SparseConnectivityLearning
from lightning_scl.data import MNISTDataModule
from lightning_scl.export import export_pruned, load_pruned, shrink_model
from lightning_scl.masking import count_connections, inject_masks, iter_masks
from lightning_scl.models import ImageClassifier, LeNet5Caffe, LeNet300100, resnet20

SIZE_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "LeNet-300-100": (LeNet300100, (1, 28, 28)),
    "LeNet-5-Caffe": (LeNet5Caffe, (1, 28, 28)),
}
LATENCY_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "LeNet-5-Caffe": (LeNet5Caffe, (1, 28, 28)),
    "ResNet-20": (resnet20, (3, 32, 32)),
}
GOAL = 0.7  # speed-up >= GOAL * (dense FLOPs / kept FLOPs)


# ---------------------------------------------------------------------------------------------------- sizes


def random_weight_masks(factory: Callable[[], nn.Module], density: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = factory().eval()
    inject_masks(model)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, _, mask in iter_masks(model):
            keep = torch.rand(mask.mask.shape, generator=generator) < density
            mask.mask.copy_(torch.where(keep, 1.0, -1.0))
    return model


def measure_sizes(densities: list[float], tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for name, (factory, _) in SIZE_MODELS.items():
        dense_path = tmp / "dense.safetensors"
        save_file({k: v.contiguous() for k, v in factory().state_dict().items()}, str(dense_path))
        for density in densities:
            model = random_weight_masks(factory, density)
            folded = export_pruned(model, tmp / "folded.safetensors")
            comp32 = export_pruned(model, tmp / "c32.scl.safetensors", format="compressed")
            comp16 = export_pruned(model, tmp / "c16.scl.safetensors", format="compressed", dtype="float16")
            plain = load_pruned(folded)
            assert all(torch.equal(load_pruned(comp32)[k], v) for k, v in plain.items())  # bit-exact round trip
            masked_keys = {f"{n}.weight" for n, _, _ in iter_masks(model)}
            kept = sum(m.kept() for _, _, m in iter_masks(model))
            connections = sum(m.numel_connections for _, _, m in iter_masks(model))
            unmasked = sum(v.numel() * v.element_size() for k, v in plain.items() if k not in masked_keys)
            limit32 = kept * 4 + math.ceil(connections / 8) + unmasked
            limit16 = kept * 2 + math.ceil(connections / 8) + unmasked // 2
            rows.append(
                {
                    "model": name,
                    "target_density": density,
                    "density": kept / connections,
                    "connections": connections,
                    "kept": kept,
                    "dense_fp32_bytes": dense_path.stat().st_size,
                    "folded_safetensors_bytes": folded.stat().st_size,
                    "compressed_fp32_bytes": comp32.stat().st_size,
                    "compressed_fp16_bytes": comp16.stat().st_size,
                    "limit_fp32_bytes": limit32,
                    "limit_fp16_bytes": limit16,
                    "fp32_over_limit": comp32.stat().st_size / limit32,
                    "fp16_over_limit": comp16.stat().st_size / limit16,
                    "fp32_compression": dense_path.stat().st_size / comp32.stat().st_size,
                }
            )
    return rows


def sizes_markdown(rows: list[dict[str, Any]]) -> str:
    kib = 1024
    lines = [
        "# Export file sizes",
        "",
        "Synthetic random per-connection masks (no training). `limit` is the information limit: kept values x "
        "bytes + 1 bit per connection + unmasked tensors (biases) stored plainly. Folded safetensors keeps the "
        "zeros, so it is as large as the dense file; the compressed file stores 1 bit per connection plus the "
        "kept values.",
        "",
        "| model | density | dense fp32 KiB | folded safetensors KiB | compressed fp32 KiB | limit fp32 KiB "
        "| fp32 / limit | compressed fp16 KiB | fp16 / limit | dense / compressed fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['density']:.2%} | {r['dense_fp32_bytes'] / kib:.1f} "
            f"| {r['folded_safetensors_bytes'] / kib:.1f} | {r['compressed_fp32_bytes'] / kib:.1f} "
            f"| {r['limit_fp32_bytes'] / kib:.1f} | {r['fp32_over_limit']:.3f} "
            f"| {r['compressed_fp16_bytes'] / kib:.1f} | {r['fp16_over_limit']:.3f} | {r['fp32_compression']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- latency


def randomize_biases_and_bn(model: nn.Module, seed: int = 0) -> None:
    """Trained-looking biases and BatchNorm statistics, so removed channels carry non-zero constants."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.1)
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            elif isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.05)


def magnitude_channel_masks(
    factory: Callable[[], nn.Module], shape: tuple[int, ...], density: float, seed: int = 0
) -> nn.Module:
    """Channel masks keeping ``density`` of the channels of every dependency group (classifier output kept)."""
    import torch_pruning as tp

    torch.manual_seed(seed)
    model = factory().eval()
    randomize_biases_and_bn(model, seed)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *shape), verbose=False)
    plans: dict[nn.Module, torch.Tensor] = {}
    for group in dg.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)):
        producers = [
            (item.dep.target.module, item.idxs)
            for item in group
            if isinstance(item.dep.target.module, (nn.Conv2d, nn.Linear))
            and dg.is_out_channel_pruning_fn(item.dep.handler)
        ]
        if any(module is classifier for module, _ in producers):
            continue
        n = len(group[0].idxs)
        score = torch.zeros(n)
        for module, idxs in producers:
            score += module.weight.detach().abs().flatten(1).sum(1)[idxs]
        keep = torch.zeros(n, dtype=torch.bool)
        keep[score.topk(max(1, round(density * n))).indices] = True
        for module, _ in producers:
            plans[module] = keep
    layers = [(name, m) for name, m in model.named_modules() if m in plans]
    inject_masks(model, layers, granularity="channel")
    with torch.no_grad():
        for _, layer, mask in iter_masks(model):
            mask.mask.copy_(torch.where(plans[layer], 1.0, -1.0).view_as(mask.mask))
    return model


def fvcore_flops(model: nn.Module, x: torch.Tensor) -> int:
    from fvcore.nn import FlopCountAnalysis

    logging.disable(logging.WARNING)
    try:
        return int(FlopCountAnalysis(model.eval(), x).unsupported_ops_warnings(False).total())
    finally:
        logging.disable(logging.NOTSET)


@torch.inference_mode()
def paired_latency_ms(models: list[nn.Module], x: torch.Tensor, reps: int, rounds: int) -> list[list[float]]:
    """Per round, the mean time of ``reps`` forwards of each model, the models taking turns within every round.

    Timing all of one model's rounds before the other's let the machine's speed drift between the two (the dense
    ResNet-20 at batch 1 took 3.2 to 7.6 ms across runs); taking turns, and alternating which model goes first, puts
    both under the same drift, so the per-round ratio cancels most of it.
    """
    for model in models:
        model.eval()
        for _ in range(max(2, reps // 4)):
            model(x)
    times: list[list[float]] = [[] for _ in models]
    for round_index in range(rounds):
        order = range(len(models)) if round_index % 2 == 0 else reversed(range(len(models)))
        for i in order:
            start = time.perf_counter()
            for _ in range(reps):
                models[i](x)
            times[i].append((time.perf_counter() - start) / reps * 1e3)
    return times


class MNISTAsCIFAR(MNISTDataModule):
    """MNIST padded to 32x32 and repeated to 3 channels: CIFAR-shaped input with a real learning signal."""

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        for name in ("train_set", "val_set", "test_set"):
            dataset = getattr(self, name, None)
            if dataset is not None and dataset.images.shape[1:] == (1, 28, 28):
                dataset.images = F.pad(dataset.images, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()
        self.input_shape = (3, 32, 32)


TRAIN_SETUPS: dict[str, dict[str, Any]] = {
    # model name in lightning_scl.models, data module, classifier to exclude, epochs, train subset
    "LeNet-5-Caffe": {
        "model": "lenet5",
        "data": MNISTDataModule,
        "exclude": ["model.classifier.3"],
        "epochs": 3,
        "subset": None,
    },
    "ResNet-20": {"model": "resnet20", "data": MNISTAsCIFAR, "exclude": ["model.fc"], "epochs": 2, "subset": 20000},
}


def trained_channel_masks(
    name: str,
    target_density: float | None,
    data_dir: str,
    smoke: bool = False,
    seed: int = 0,
    callbacks: Sequence[Any] = (),
) -> tuple[nn.Module, float]:
    """Train channel SCL (connection-count regularizer) toward ``target_density`` of the connections.

    ``target_density=None`` trains the dense network the same way (the baseline). ``callbacks`` join the SCL
    callback in the Trainer (e.g. to record the density). Returns the model and its test accuracy.
    """
    import lightning.pytorch as L

    setup = TRAIN_SETUPS[name]
    L.seed_everything(seed, workers=True)
    data = setup["data"](data_dir=data_dir, batch_size=128, seed=seed, train_subset=256 if smoke else setup["subset"])
    module = ImageClassifier(setup["model"], lr=0.05, weight_decay=5e-4, input_shape=LATENCY_MODELS[name][1])
    scl = (
        []
        if target_density is None
        else [
            SparseConnectivityLearning(
                target_density=target_density,
                granularity="channel",
                # Not "flops": weighting by MACs puts 20-40x more pressure on LeNet-5's convolution channels than on
                # its fully connected units, and a first run here lost every channel of both conv layers.
                regularizer="connections",
                exclude=setup["exclude"],
                report=False,
            )
        ]
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1 if smoke else setup["epochs"],
        max_steps=3 if smoke else -1,
        callbacks=[*scl, *callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        limit_test_batches=2 if smoke else None,
    )
    trainer.fit(module, data)
    accuracy = trainer.test(module, data, verbose=False)[0]["test/acc"]
    return module.model.eval(), float(accuracy)


def measure_latency(
    masks: str,
    densities: list[float],
    batches: list[int],
    reps: int,
    rounds: int,
    tmp: Path,
    data_dir: str = "data",
    smoke: bool = False,
) -> list[dict[str, Any]]:
    """Time dense vs shrunk; ``densities`` are channel fractions (synthetic) or connection targets (trained)."""
    rows = []
    for name, (factory, shape) in LATENCY_MODELS.items():
        for density in densities:
            accuracy = None
            if masks == "trained":
                masked, accuracy = trained_channel_masks(name, density, data_dir, smoke=smoke)
            else:
                masked = magnitude_channel_masks(factory, shape, density)
            x1 = torch.randn(1, *shape)
            path = export_pruned(masked, tmp / "model.shrunk.pt", format="shrunk", example_input=x1)
            small, record = shrink_model(masked, x1)
            dense = factory().eval()
            dense.load_state_dict(load_pruned(export_pruned(masked, tmp / "dense.safetensors")))
            with torch.no_grad():
                max_diff = float((small(x1) - dense(x1)).abs().max())
            kept, total = count_connections(masked)
            dense_flops, kept_flops = fvcore_flops(dense, x1), fvcore_flops(small, x1)
            for batch in batches:
                x = torch.randn(batch, *shape)
                dense_times, small_times = paired_latency_ms([dense, small], x, reps, rounds)
                t_dense, t_small = statistics.median(dense_times), statistics.median(small_times)
                ratios = [d / s for d, s in zip(dense_times, small_times, strict=True)]
                speedup, flops_ratio = statistics.median(ratios), dense_flops / kept_flops
                rows.append(
                    {
                        "model": name,
                        "masks": masks,
                        "density_setting": density,
                        "connection_density": kept / total,
                        "test_acc": accuracy,
                        "batch": batch,
                        "params_dense": record["params_before"],
                        "params_shrunk": record["params_after"],
                        "shrunk_file_bytes": path.stat().st_size,
                        "dense_flops": dense_flops,
                        "kept_flops": kept_flops,
                        "flops_ratio": flops_ratio,
                        "channels_kept_for_exactness": record["kept_for_exactness"],
                        "max_abs_diff": max_diff,
                        "dense_ms": t_dense,
                        "shrunk_ms": t_small,
                        "speedup": speedup,
                        "speedup_low": min(ratios),
                        "speedup_high": max(ratios),
                        "rounds": rounds,
                        "reps": reps,
                        "goal_speedup": GOAL * flops_ratio,
                        "meets_goal": speedup >= GOAL * flops_ratio,
                    }
                )
                print(
                    f"{name:14s} {masks} {density:.2f} batch {batch:3d}: dense {t_dense:8.3f} ms, shrunk "
                    f"{t_small:8.3f} ms, speed-up {speedup:5.2f}x ({min(ratios):.2f}-{max(ratios):.2f}; FLOPs ratio "
                    f"{flops_ratio:5.2f}x, goal {GOAL * flops_ratio:5.2f}x)",
                    flush=True,
                )
    return rows


def latency_markdown(rows: list[dict[str, Any]], masks: str, threads: int) -> str:
    if masks == "trained":
        setting = "target connection density"
        description = (
            'Channel masks learned by `SparseConnectivityLearning(granularity="channel", target_density=...)` '
            "(connection-count regularizer, default freeze at 70%; classifier excluded, SGD 0.05, cosine, batch "
            "128): LeNet-5-Caffe 3 epochs on MNIST; ResNet-20 2 epochs on 20,000 MNIST images padded to 32x32 and"
            " repeated to 3 channels (CIFAR is not downloadable here; the latency depends only on the shapes). "
            "Test accuracy is the masked model's on the MNIST test set; the shrunk model computes the same "
            "function (max abs diff)."
        )
    else:
        setting = "channel density"
        description = (
            "Synthetic channel masks (no training): in every dependency group the channels of largest summed L1 "
            "norm are kept (classifier outputs all kept); biases and BatchNorm statistics randomized so removed "
            "channels carry constants that the shrink folds."
        )
    lines = [
        f"# Shrunk vs dense CPU latency ({masks} masks)",
        "",
        description + " FLOPs by fvcore (multiply-accumulates) at batch 1. Latency in `torch.inference_mode`: in "
        "each round the dense and the shrunk model take turns (alternating which goes first), each timed as the "
        "mean of a batch of forwards; the ms columns are medians over rounds, the speed-up is the median of the "
        "per-round dense/shrunk ratios, with their lowest and highest in brackets. Goal: speed-up >= "
        f"{GOAL} x (dense FLOPs / kept FLOPs).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {threads} threads.",
        "",
        f"| model | {setting} | connections kept | test acc | batch | params dense -> shrunk | FLOPs dense / kept "
        "| dense ms | shrunk ms | speed-up | goal | met | max abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|---:|",
    ]
    for r in rows:
        accuracy = "-" if r["test_acc"] is None else f"{100 * r['test_acc']:.2f}%"
        lines.append(
            f"| {r['model']} | {r['density_setting']:.2f} | {100 * r['connection_density']:.1f}% | {accuracy} "
            f"| {r['batch']} | {r['params_dense']:,} -> {r['params_shrunk']:,} | {r['flops_ratio']:.2f}x "
            f"| {r['dense_ms']:.3f} | {r['shrunk_ms']:.3f} | {r['speedup']:.2f}x ({r['speedup_low']:.2f}-"
            f"{r['speedup_high']:.2f}) | {r['goal_speedup']:.2f}x "
            f"| {'yes' if r['meets_goal'] else 'no'} | {r['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["sizes", "latency", "all"], default="all")
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI; writes results only with --out")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the latency part")
    parser.add_argument("--reps", type=int, default=50, help="forwards per timing round")
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds (medians are reported)")
    parser.add_argument("--masks", choices=["trained", "synthetic"], default="trained", help="latency masks")
    parser.add_argument("--data-dir", default="data", help="MNIST cache (trained masks)")
    args = parser.parse_args(argv)

    out = args.out if args.out is not None else (None if args.smoke else Path(__file__).parent / "results")
    size_densities = [0.02] if args.smoke else [0.1, 0.02, 0.005]
    if args.masks == "trained":  # connection targets for channel SCL
        channel_densities = [0.3] if args.smoke else [0.3, 0.1]
    else:  # channel fractions kept
        channel_densities = [0.5] if args.smoke else [0.5, 0.25]
    batches = [1] if args.smoke else [1, 64]
    reps, rounds = (2, 2) if args.smoke else (args.reps, args.rounds)
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if args.part in ("sizes", "all"):
            rows = measure_sizes(size_densities, tmp)
            text = sizes_markdown(rows)
            print(text)
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                (out / "export_sizes.md").write_text(text)
                (out / "export_sizes.json").write_text(json.dumps(rows, indent=2) + "\n")
        if args.part in ("latency", "all"):
            rows = measure_latency(
                args.masks, channel_densities, batches, reps, rounds, tmp, data_dir=args.data_dir, smoke=args.smoke
            )
            text = latency_markdown(rows, args.masks, torch.get_num_threads())
            print(text)
            if out is not None:
                stem = "export_latency" if args.masks == "trained" else "export_latency_synthetic"
                out.mkdir(parents=True, exist_ok=True)
                (out / f"{stem}.md").write_text(text)
                (out / f"{stem}.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
