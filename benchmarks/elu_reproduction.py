"""ELU paper claims re-measured on data we have: learning speed and mean activations, ReLU vs LReLU vs ELU (+BN).

Two networks, both built with ReLU modules and switched to ELU by this project's ``swap_activations`` (the ELU rows
therefore exercise the product, not a hand-written ELU net):

- ``mlp``: the ELU paper's MNIST network, 8 hidden layers of 128 units, He init, SGD lr 0.01, batch 64 (the paper's
  setting as secondary sources describe it);
- ``cnn``: a deep CNN without batch norm on Fashion-MNIST: 8 conv layers (16-16-32-32-64-64-64-64 channels, 3x3,
  max-pool after layers 2 and 4), global average pool, linear head; a CPU-sized stand-in for the paper's CIFAR net,
  trained on a fixed subset of the training set (``--train-subset``) with SGD lr 0.01 momentum 0.9, batch 64.

Variants: ``relu``, ``lrelu`` (slope 0.1), ``elu`` (alpha 1), ``relu_bn`` and ``elu_bn`` (BatchNorm before every
activation). Per epoch: mean training loss over the epoch, test accuracy, and the median over units of each unit's
mean activation on a fixed batch (averaged over hidden layers): the paper's claim is that ELU keeps it closest to 0.

Usage::

    python benchmarks/elu_reproduction.py --net mlp --epochs 10 --seeds 0 1 2
    python benchmarks/elu_reproduction.py --net cnn --epochs 5 --seeds 0 --train-subset 10000
    python benchmarks/elu_reproduction.py --smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_scl.activations import swap_activations
from lightning_scl.data import FashionMNISTDataModule, MNISTDataModule

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("relu", "lrelu", "elu", "relu_bn", "elu_bn")


def _activation(variant: str) -> nn.Module:
    return nn.LeakyReLU(0.1) if variant == "lrelu" else nn.ReLU()


def build(net: str, variant: str) -> nn.Module:
    bn = variant.endswith("_bn")
    layers: list[nn.Module] = []
    if net == "mlp":
        layers.append(nn.Flatten())
        width_in = 784
        for _ in range(8):
            layers += [nn.Linear(width_in, 128)] + ([nn.BatchNorm1d(128)] if bn else []) + [_activation(variant)]
            width_in = 128
        layers.append(nn.Linear(128, 10))
    else:
        channels_in = 1
        for i, channels in enumerate((16, 16, 32, 32, 64, 64, 64, 64)):
            layers += [nn.Conv2d(channels_in, channels, 3, padding=1)]
            layers += ([nn.BatchNorm2d(channels)] if bn else []) + [_activation(variant)]
            if i in (1, 3):
                layers.append(nn.MaxPool2d(2))
            channels_in = channels
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    if variant.startswith("elu"):
        report = swap_activations(model, alpha=1.0, quiet=True)
        assert len(report.modules) == 8, report
    return model


def load(net: str, data_dir: str, subset: int | None):
    module_cls = MNISTDataModule if net == "mlp" else FashionMNISTDataModule
    dm = module_cls(data_dir=data_dir, batch_size=64, val_size=0 if subset is None else 5000, train_subset=subset)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


def _tensors(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def median_unit_mean_activation(model: nn.Module, x: torch.Tensor) -> float:
    """Mean over hidden layers of the median (over units) of each unit's mean activation on ``x``."""
    values: list[float] = []

    def hook(_, __, out):
        per_unit = out.mean(dim=0) if out.dim() == 2 else out.mean(dim=(0, 2, 3))
        values.append(per_unit.median().item())

    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.ELU))]
    handles = [m.register_forward_hook(hook) for m in acts]
    with torch.no_grad():
        model.eval()
        model(x)
        model.train()
    for h in handles:
        h.remove()
    return statistics.mean(values)


def run(net: str, variant: str, seed: int, epochs: int, data, max_steps: int | None) -> dict:
    torch.manual_seed(seed)
    model = build(net, variant)
    momentum = 0.0 if net == "mlp" else 0.9
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=momentum)
    train_loader = data.train_dataloader()
    x_test, y_test = _tensors(data.test_dataloader())
    probe = x_test[:1000]
    curve = []
    for epoch in range(epochs):
        start, losses = time.perf_counter(), []
        for step, (x, y) in enumerate(train_loader):
            if max_steps is not None and step >= max_steps:
                break
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        model.train()
        curve.append(
            {
                "epoch": epoch + 1,
                "train_loss": statistics.mean(losses),
                "test_acc": acc,
                "median_unit_mean_act": median_unit_mean_activation(model, probe),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        print(net, variant, seed, curve[-1], flush=True)
    return {"net": net, "variant": variant, "seed": seed, "curve": curve}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", choices=["mlp", "cnn"], default="mlp")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/elu_<net>.json")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 when two runs share 2 cores)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    max_steps = None
    if args.smoke:
        args.epochs, args.seeds, args.train_subset, max_steps = 1, [0], 256, 3
    data = load(args.net, args.data_dir, args.train_subset)
    runs = [run(args.net, v, s, args.epochs, data, max_steps) for s in args.seeds for v in args.variants]
    if args.smoke:
        return
    out = args.out or RESULTS / f"elu_{args.net}.json"
    meta = {"epochs": args.epochs, "seeds": args.seeds, "train_subset": args.train_subset, "threads": args.threads}
    meta["torch"] = torch.__version__
    meta["machine"] = platform.machine()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
