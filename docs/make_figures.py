"""Draw the figures of the concept pages into ``docs/img/`` from the package's own functions (no training).

    python docs/make_figures.py            # rewrites docs/img/*.png
    python docs/make_figures.py --out DIR  # somewhere else (the test suite checks that the script runs)

Every curve comes from the code the callbacks run (``ste_derivative``, ``normalize_mask_gradient_``,
``SparseConnectivityLearning.scheduled_density``, ``torch.nn.functional``), so a figure cannot show a method the
package does not implement.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lightning_scl.callbacks.scl import SparseConnectivityLearning
from lightning_scl.masking import STES, normalize_mask_gradient_, ste_derivative

IMG = Path(__file__).resolve().parent / "img"
FIGURES = ("ste.png", "normalization.png", "schedule.png", "elu.png")


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, metadata={"Software": None})  # no version string: regenerating does not churn the PNGs
    return path


def draw_ste(path: Path) -> Path:
    """The unit step of the forward pass and the three positive proxies of its derivative used in the backward."""
    m = torch.linspace(-4, 4, 801)
    figure = _figure(8.0, 3.0)
    ax_step, ax_proxy = figure.subplots(1, 2)
    ax_step.plot(m, (m > 0).float(), color="black")
    ax_step.set_title("forward: $H(m) = 1[m > 0]$")
    ax_step.set_xlabel("mask variable $m$")
    ax_step.set_ylabel("gate")
    labels = {
        "identity": "identity: 1",
        "leaky_relu": "leaky_relu: 1 / slope 0.1",
        "softplus": r"softplus: $\sigma(m)$",
    }
    for ste in STES:
        proxy = ste_derivative(m, ste, slope=0.1)
        values = torch.full_like(m, proxy) if isinstance(proxy, float) else proxy
        ax_proxy.plot(m, values, label=labels[ste])
    ax_proxy.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
    ax_proxy.set_ylim(-0.1, 1.2)
    ax_proxy.set_title(r"backward: proxy $\partial H / \partial m$ (always $> 0$)")
    ax_proxy.set_xlabel("mask variable $m$")
    ax_proxy.legend(fontsize=8, loc="center right")
    for ax in (ax_step, ax_proxy):
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle=":")
        ax.grid(alpha=0.3)
    return _save(figure, path)


def draw_normalization(path: Path, lam: float = 0.1) -> Path:
    """Mean |task gradient| per output unit of one layer, before and after per-feature normalization, against lam."""
    generator = torch.Generator().manual_seed(0)
    units = 8
    scales = torch.logspace(-3, 0, units)  # unit gradients spanning three orders of magnitude
    grad = torch.randn(units, 64, generator=generator) * scales[:, None]
    before = grad.abs().mean(dim=1)
    after = normalize_mask_gradient_(grad.clone(), feature_dim=0, statistic="mean_abs").abs().mean(dim=1)
    figure = _figure(8.0, 3.0)
    axes = figure.subplots(1, 2, sharey=True)
    for ax, values, title in ((axes[0], before, "before: raw $dL/dm$"), (axes[1], after, "after: divided per unit")):
        ax.bar(range(units), values.tolist(), color="tab:blue", label="mean |task gradient|")
        ax.axhline(lam, color="tab:red", linestyle="--", label=f"regularizer pressure lam = {lam}")
        ax.set_yscale("log")
        ax.set_xlabel("output unit (feature)")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("per-connection magnitude")
    axes[1].legend(fontsize=8, loc="lower right")
    return _save(figure, path)


def draw_schedule(path: Path, target: float = 0.02, ramp_end: float = 0.5) -> Path:
    """The density the target-density controller steers to: a cubic decay until ``ramp_end``, then flat."""
    scl = SparseConnectivityLearning(target_density=target, ramp_end=ramp_end)
    progress = [i / 200 for i in range(201)]
    figure = _figure(6.0, 3.0)
    ax = figure.subplots()
    ax.plot(progress, [scl.scheduled_density(p) for p in progress], color="tab:blue")
    ax.axhline(target, color="grey", linestyle=":", label=f"target_density = {target}")
    ax.axvline(ramp_end, color="grey", linestyle="--", label=f"ramp_end = {ramp_end}")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of training (optimizer steps)")
    ax.set_ylabel("scheduled density")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(figure, path)


def draw_elu(path: Path) -> Path:
    """ELU against ReLU and leaky ReLU, and their derivatives."""
    x = torch.linspace(-4, 3, 701, requires_grad=True)
    curves: dict[str, Any] = {
        "ReLU": F.relu,
        "LeakyReLU (0.1)": lambda t: F.leaky_relu(t, 0.1),
        "ELU (alpha = 1)": lambda t: F.elu(t, 1.0),
    }
    figure = _figure(8.0, 3.0)
    ax_f, ax_d = figure.subplots(1, 2)
    for label, fn in curves.items():
        y = fn(x)
        (dy,) = torch.autograd.grad(y.sum(), x)
        ax_f.plot(x.detach(), y.detach(), label=label)
        ax_d.plot(x.detach(), dy, label=label)
    ax_f.set_title("activation")
    ax_d.set_title("derivative")
    for ax in (ax_f, ax_d):
        ax.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
    ax_f.legend(fontsize=8)
    return _save(figure, path)


def main(out: Path = IMG) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    drawers = (draw_ste, draw_normalization, draw_schedule, draw_elu)
    return [draw(out / name) for draw, name in zip(drawers, FIGURES)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=IMG)
    for written in main(parser.parse_args().out):
        print(f"wrote {written} ({written.stat().st_size / 1024:.0f} KiB)")
