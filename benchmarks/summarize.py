"""Turn ``benchmarks/results/mnist_pruning.jsonl`` (and ``elu_*.json``) into the committed tables and plots.

Writes, under ``benchmarks/results/``:

- ``mnist_headline.md``: SCL runs tagged ``headline`` (mean +- std over seeds) beside the published anchors and
  this project's targets;
- ``mnist_side_by_side.md`` and ``mnist_pareto.png``: runs tagged ``side_by_side``: SCL vs ModelPruning (gradual
  global L1) at each target density, same model, epochs and optimizer, plus the dense baseline;
- ``mnist_ablations.md``: runs tagged ``ablation:<name>``;
- ``mnist_flops.md`` and ``mnist_flops.png``: LeNet-5-Caffe accuracy against effective FLOPs for ModelPruning and
  SCL with the connection-count and the FLOPs-weighted regularizer;
- ``mnist_side_by_side_60_epochs.md``: the same comparison at a 60-epoch budget (runs tagged ``side_by_side_e60``);
- ``mnist_side_by_side_augmented_50_epochs.md``: shifted images, 50 epochs on all 60k images (ModelPruning runs
  tagged ``side_by_side_augmented_e50``, SCL runs tagged ``augmented``);
- ``mnist_side_by_side_augmented.md`` and ``mnist_pareto_augmented.png``: the same comparison with training images
  randomly shifted (runs tagged ``side_by_side_augmented``; the dense baseline is the run tagged ``augmented``);
- ``mnist_tuning.md``: runs tagged ``tune:<name>`` (training hyperparameters), ranked by validation accuracy;
- ``elu_<net>.md`` and ``elu_<net>.png`` from ``elu_<net>.json``: training loss per epoch and median unit mean
  activation, mean over seeds.

Usage::

    python benchmarks/summarize.py
    python benchmarks/summarize.py --smoke      # CI: summarize a tiny synthetic result set in a temp dir
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"

# Published MNIST results: (test error %, fraction of weights kept), from the papers as listed in GUIDE.md.
ANCHORS = {
    "lenet300": [
        ("Han et al. 2015 (magnitude + retrain)", 1.59, 0.08),
        ("DNS, Guo et al. 2016", 1.99, 0.018),
        ("Sparse VD, Molchanov et al. 2017", 1.92, 0.0147),
    ],
    "lenet5": [
        ("Han et al. 2015 (magnitude + retrain)", 0.77, 0.08),
        ("DNS, Guo et al. 2016", 0.91, 0.009),
        ("Sparse VD, Molchanov et al. 2017", 0.75, 0.0036),
    ],
}
# The training recipe shared by the MNIST runs (mnist_pruning.py's defaults); a headline row names what it changes.
RECIPE = {
    "lr": 0.05,
    "weight_decay": 5e-4,
    "batch_size": 128,
    "ramp": 0.6,
    "freeze": 0.7,
    "distill_alpha": 0.5,  # recorded by every run; only matters with a teacher
    "distill_temperature": 4.0,
}
RECIPE_NAMES = {
    "lr": "lr",
    "weight_decay": "weight decay",
    "batch_size": "batch",
    "ramp": "ramp",
    "freeze": "freeze",
    "distill_alpha": "distillation weight",
    "distill_temperature": "distillation temperature",
}
TARGETS = {"lenet300": (98.2, 0.015), "lenet5": (99.2, 0.004)}
NAMES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5-Caffe"}
METHOD_NAMES = {"scl": "SCL", "modelpruning": "ModelPruning"}


@functools.cache
def _dense_macs(model: str) -> dict[str, int]:
    import torch  # here, not at the top: the ELU and smoke summaries need neither torch nor fvcore

    from lightning_scl.accounting import dense_macs_by_layer
    from lightning_scl.models import ImageClassifier

    return dense_macs_by_layer(ImageClassifier(model), torch.zeros(1, 1, 28, 28))


def _flops_pct(run: dict) -> float | None:
    """Effective multiply-accumulates as % of dense: each layer's kept fraction times its dense MACs.

    Exact for unstructured pruning of Linear/Conv weights (a kept weight costs one MAC per output position); None
    for runs recorded before ``layer_density`` was.
    """
    kept = run.get("layer_density")
    if not kept:
        return None
    macs = _dense_macs(run["model"])
    return 100 * sum(kept[name] * n for name, n in macs.items()) / sum(macs.values())


def _load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _add_once_per_seed(group: list[dict], run: dict) -> None:
    """Append ``run`` unless ``group`` already has a run with its seed (a repeated run must not count twice)."""
    if all(other["seed"] != run["seed"] for other in group):
        group.append(run)


def _recipe_variant(run: dict) -> tuple[bool, str, bool, bool]:
    """What a run changed beyond the settings: trained on all 60k images, its activation, distilled from a teacher,
    started from a trained dense network."""
    cfg = run["config"]
    return (
        cfg.get("val_size", 5000) == 0,
        cfg.get("activation", "relu"),
        cfg.get("teacher") is not None,
        cfg.get("init_from") is not None,
    )


PLAIN_RECIPE = (False, "relu", False, False)


def mean_std(values: list[float], digits: int = 2) -> str:
    """``mean +- stdev`` of ``values`` to ``digits`` decimals (just the value for one seed); shared by the tables."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


def headline(runs: list[dict]) -> str:
    """SCL at the target densities beside the published anchors; dense rows give the recipe's ceiling.

    Runs tagged ``augmented`` (training images randomly shifted, which the anchors did not do) get their own rows and
    are marked as such: they answer what the recipe's ceiling costs, not whether the like-for-like target is met.
    """
    lines = [
        "| model | method | test error % | weights kept % | seeds | epochs | meets target |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        dense_baseline = r.get("tag") == "side_by_side" and r["method"] == "dense"
        if r.get("tag") in ("headline", "augmented") or dense_baseline:
            shift = r["config"].get("max_shift", 0)
            # ramp and freeze are SCL settings: a dense run records whatever the flags held
            changed = tuple(
                (k, r["config"][k])
                for k, v in RECIPE.items()
                if r["config"].get(k, v) != v and not (r["method"] == "dense" and k in ("ramp", "freeze"))
            )
            variant = _recipe_variant(r)
            key = (
                r["model"],
                r["method"] == "dense",
                shift,
                -(r["target_density"] or 1),
                changed,
                variant,
                -r["epochs"],
            )
            _add_once_per_seed(groups[key], r)
    for model in ("lenet300", "lenet5"):
        for name, err, kept in ANCHORS[model]:
            lines.append(f"| {NAMES[model]} | {name} | {err:.2f} | {100 * kept:.2f} | published | | |")
        for (m, dense, shift, _, changed, variant, _), rs in sorted(groups.items()):
            full_train, activation, distilled, from_trained = variant
            if m != model:
                continue
            rs = sorted(rs, key=lambda r: r["seed"])
            acc = [100 * r["test_acc"] for r in rs]
            dens = [100 * r["density"] for r in rs]
            goal_acc, goal_density = TARGETS[model]
            method = "dense" if dense else f"SCL (target density {100 * rs[0]['target_density']:.2f}%)"
            verdict = (
                ""
                if dense
                else ("yes" if statistics.mean(acc) >= goal_acc and max(dens) <= 100 * goal_density else "no")
            )
            method += "".join(f", {RECIPE_NAMES[k]} {v:g}" for k, v in changed)
            if activation != "relu":
                method += f", {activation.upper()}"
            if distilled:
                method += ", distilled from the dense network"
            if from_trained:
                method += ", pruning a trained dense network (epochs: the pruning run)"
            if full_train:
                method += ", trained on all 60k images"
            if shift:
                method += f", training images shifted up to {shift} px"
                verdict += (", " if verdict else "") + "not comparable: the anchors used no augmentation"
            elif verdict:
                verdict += f" (target >= {goal_acc}% at <= {100 * goal_density:.1f}%)"
            if distilled and not dense:
                verdict += "; the anchors used no teacher"
            lines.append(
                f"| {NAMES[model]} | {method} | {mean_std([100 - a for a in acc])} | {mean_std(dens)} | "
                f"{', '.join(str(r['seed']) for r in rs)} | {rs[0]['epochs']} | {verdict} |"
            )
    return "\n".join(lines)


def _save_accuracy_plot(fig, ax, path: Path, xlabel: str, title: str) -> None:
    """Test accuracy against a log-scaled cost axis, written to ``path``."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def side_by_side(runs: list[dict], plot_path: Path | None, augmented: bool = False, tag: str | None = None) -> str:
    """SCL against ModelPruning at each target density, with the dense baseline.

    ``augmented=True`` tabulates the runs tagged ``side_by_side_augmented`` (training images randomly shifted), with
    the dense run tagged ``augmented`` as their baseline. ``tag`` picks another set of side-by-side runs (e.g. a
    longer budget, ``side_by_side_e60``).
    """
    tag = tag or ("side_by_side_augmented" if augmented else "side_by_side")
    rows = [r for r in runs if r.get("tag") == tag]
    if augmented:
        # the dense baseline of the same budget and training images
        budgets = {(r["model"], r["epochs"], _recipe_variant(r)) for r in rows}
        rows += [
            r
            for r in runs
            if r.get("tag") == "augmented"
            and r["method"] == "dense"
            and (r["model"], r["epochs"], _recipe_variant(r)) in budgets
        ]

    # A headline SCL run (tagged ``augmented`` for shifted images) with the same model, density, epochs and shift as
    # a side-by-side ModelPruning run is the same experiment (only more seeds): use it where no side-by-side SCL run
    # exists.
    def same_experiment(r: dict) -> tuple:
        return r["model"], r["target_density"], r["epochs"], r["config"].get("max_shift", 0), _recipe_variant(r)

    compared = {same_experiment(r) for r in rows if r["method"] == "modelpruning"}
    have_scl = {same_experiment(r) for r in rows if r["method"] == "scl"}
    headline_tag = "augmented" if augmented else "headline"
    rows += [
        r
        for r in runs
        if r.get("tag") == headline_tag
        and r["method"] == "scl"
        and (key := same_experiment(r)) in compared
        and key not in have_scl
    ]
    lines = [
        "| model | target density % | ModelPruning acc % (density %) | SCL acc % (density %) | SCL - MP (points) "
        "| FLOPs % MP / SCL |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    by_key: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    dense: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["method"] == "dense":
            dense[r["model"]].append(100 * r["test_acc"])
        else:
            by_key[(r["model"], r["target_density"])][r["method"]].append(r)
    for (model, target), methods in sorted(by_key.items(), key=lambda kv: (kv[0][0], -kv[0][1])):

        def cell(rs: list[dict]) -> tuple[str, float | None]:
            if not rs:
                return "-", None
            accs = [100 * r["test_acc"] for r in rs]
            seeds = f", {len(rs)} seeds" if len(rs) > 1 else ""
            density = statistics.mean(100 * r["density"] for r in rs)
            return f"{mean_std(accs)} ({density:.2f}{seeds})", statistics.mean(accs)

        mp, mp_acc = cell(methods.get("modelpruning", []))
        scl, scl_acc = cell(methods.get("scl", []))
        # "+ 0.0" turns a rounded -0.0 into 0.0, so a tie never prints as "-0.00"
        diff = f"{round(scl_acc - mp_acc, 2) + 0.0:+.2f}" if mp_acc is not None and scl_acc is not None else "-"
        flops = " / ".join(_mean_flops(methods.get(m, [])) for m in ("modelpruning", "scl"))
        lines.append(f"| {NAMES[model]} | {100 * target:.1f} | {mp} | {scl} | {diff} | {flops} |")
    for model, accs in dense.items():
        lines.append(f"| {NAMES[model]} | 100 (dense) | {statistics.mean(accs):.2f} | | | 100 |")
    if plot_path is not None and by_key:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, marker in (("modelpruning", "s"), ("scl", "o")):
            for model in sorted({k[0] for k in by_key}):
                pts = sorted(
                    (100 * statistics.mean(r["density"] for r in rs), 100 * statistics.mean(r["test_acc"] for r in rs))
                    for (m, _), methods in by_key.items()
                    if m == model and (rs := methods.get(method))
                )
                if pts:
                    ax.plot(*zip(*pts), marker=marker, label=f"{NAMES[model]} {method}")
        for model, accs in dense.items():
            ax.axhline(statistics.mean(accs), linestyle=":", color="gray", label=f"{NAMES[model]} dense")
        title = "MNIST: accuracy vs density, same training budget" + (", shifted images" if augmented else "")
        _save_accuracy_plot(fig, ax, plot_path, "weights kept (%)", title)
    return "\n".join(lines)


def _mean_flops_pct(rs: list[dict]) -> float | None:
    """Mean effective FLOPs % over the runs that recorded per-layer densities (all but a few early ones)."""
    values = [f for r in rs if (f := _flops_pct(r)) is not None]
    return statistics.mean(values) if values else None


def _mean_flops(rs: list[dict]) -> str:
    mean = _mean_flops_pct(rs)
    return "-" if mean is None else f"{mean:.2f}"


def flops_tradeoff(runs: list[dict], plot_path: Path | None) -> str:
    """LeNet-5-Caffe accuracy against effective FLOPs: ModelPruning, SCL counting connections, SCL counting FLOPs.

    The issue's question for the FLOPs-weighted regularizer is the FLOPs it needs at equal accuracy, so the three are
    compared on that axis. SCL rows use the current defaults (network-wide normalization) apart from the regularizer.
    """

    def label(r: dict) -> str | None:
        if r["model"] != "lenet5" or r["method"] == "dense":
            return None
        if r["method"] == "modelpruning":
            return "ModelPruning" if r.get("tag") == "side_by_side" else None
        cfg = r["config"]
        if cfg.get("normalize_over") != "network" or cfg.get("fan_in_exponent") or _recipe_variant(r) != PLAIN_RECIPE:
            return None
        if r.get("tag") == "side_by_side" or (r.get("tag") == "headline" and cfg["regularizer"] == "connections"):
            return "SCL, connections"
        if r.get("tag") == "ablation:regularizer" and cfg["regularizer"] == "flops":
            return "SCL, FLOPs-weighted"
        return None

    groups: dict[tuple[str, float, int], list[dict]] = defaultdict(list)
    for r in runs:
        if (name := label(r)) is not None:
            _add_once_per_seed(groups[(name, r["target_density"], r["epochs"])], r)
    lines = [
        "| method | target density % | test acc % | density % | effective FLOPs % of dense | seeds | epochs |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (name, target, epochs), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        acc = [100 * r["test_acc"] for r in rs]
        dens = [100 * r["density"] for r in rs]
        seeds = ", ".join(str(r["seed"]) for r in rs)
        lines.append(
            f"| {name} | {100 * target:g} | {mean_std(acc)} | {mean_std(dens)} | {_mean_flops(rs)} | {seeds} | "
            f"{epochs} |"
        )
        if (flops := _mean_flops_pct(rs)) is not None:
            points[name].append((flops, statistics.mean(acc)))
    if plot_path is not None and points:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, marker in zip(sorted(points), "sod"):
            ax.plot(*zip(*sorted(points[name])), marker=marker, label=name)
        budgets = "/".join(str(e) for e in sorted({epochs for _, _, epochs in groups}))
        xlabel = "effective multiply-accumulates (% of dense)"
        _save_accuracy_plot(fig, ax, plot_path, xlabel, f"LeNet-5-Caffe on MNIST: accuracy vs FLOPs, {budgets} epochs")
    return "\n".join(lines)


def _paired_runs(by_column: dict[Any, list[dict]], columns: list) -> tuple[list[int], dict[Any, list[dict]]]:
    """The seeds every one of ``columns`` has, and each column's runs for just those seeds, in seed order."""
    seeds = sorted(set.intersection(*({r["seed"] for r in by_column[c]} for c in columns)))
    picked = {c: sorted((r for r in by_column[c] if r["seed"] in seeds), key=lambda r: r["seed"]) for c in columns}
    return seeds, picked


def exact_density(runs: list[dict]) -> str:
    """SCL with ``exact_density`` (tag ``side_by_side_exact``) beside the controller-only SCL runs and ModelPruning.

    The side-by-side runs predate ``exact_density`` (they record no such key): their SCL density is the controller's.
    Only the seeds present in all three cells are compared, so the differences are paired.
    """
    cells: dict[tuple[str, float], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r["method"] == "dense" or r["config"].get("max_shift", 0):
            continue
        if r.get("tag") == "side_by_side_exact" and r["method"] == "scl":
            column = "exact"
        elif r.get("tag") in ("side_by_side", "headline") and not r["config"].get("exact_density", False):
            column = r["method"]
        else:
            continue
        _add_once_per_seed(cells[(r["model"], r["target_density"])][column], r)
    lines = [
        "| model | target density % | seeds | ModelPruning acc % (density %) | SCL, controller only: acc % (density %) "
        "| SCL, exact density: acc % (density %) | exact - controller | exact - MP (points) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for (model, target), columns in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        if not columns["exact"]:
            continue
        seeds, picked = _paired_runs(columns, ["modelpruning", "scl", "exact"])
        if not seeds:
            continue
        acc = {c: statistics.mean(100 * r["test_acc"] for r in rs) for c, rs in picked.items()}
        text = {
            c: f"{mean_std([100 * r['test_acc'] for r in rs])} ({statistics.mean(100 * r['density'] for r in rs):.2f})"
            for c, rs in picked.items()
        }
        # "+ 0.0" turns a rounded -0.0 into 0.0, so a tie never prints as "-0.00"
        versus_controller = f"{round(acc['exact'] - acc['scl'], 2) + 0.0:+.2f}"
        versus_mp = f"{round(acc['exact'] - acc['modelpruning'], 2) + 0.0:+.2f}"
        lines.append(
            f"| {NAMES[model]} | {100 * target:.1f} | {', '.join(map(str, seeds))} | {text['modelpruning']} "
            f"| {text['scl']} | {text['exact']} | {versus_controller} | {versus_mp} |"
        )
    return "\n".join(lines)


def distillation(runs: list[dict]) -> str:
    """Both methods trained with knowledge distillation from a dense teacher (tag ``kd``) beside the plain runs.

    Only seeds present in all four cells of a row are compared. A run that diverged (test accuracy below 50%) is
    left out with its seed and listed under the table. The plain SCL runs predate ``exact_density``; the distilled
    ones snap to the exact target at the freeze (worth +0.03 points at 2% without distillation).
    """
    cells: dict[tuple[str, float], dict[tuple[str, bool], list[dict]]] = defaultdict(lambda: defaultdict(list))
    diverged: list[str] = []
    for r in runs:
        if r["method"] == "dense" or r["config"].get("max_shift", 0):
            continue
        distilled = r.get("tag") == "kd"
        plain = r.get("tag") in ("side_by_side", "headline") and not r["config"].get("exact_density", False)
        if distilled and r["test_acc"] < 0.5:
            diverged.append(
                f"{NAMES[r['model']]} at {100 * r['target_density']:g}%, {METHOD_NAMES[r['method']]}, distilled, "
                f"seed {r['seed']}: {100 * r['test_acc']:.2f}% test accuracy"
            )
        elif distilled or plain:
            _add_once_per_seed(cells[(r["model"], r["target_density"])][(r["method"], distilled)], r)
    lines = [
        "| model | target density % | seeds | ModelPruning | SCL | SCL - MP | ModelPruning, distilled | SCL, distilled "
        "| SCL - MP, distilled |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    columns = [("modelpruning", False), ("scl", False), ("modelpruning", True), ("scl", True)]
    for (model, target), by_column in sorted(cells.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        seeds, picked = _paired_runs(by_column, columns)
        if not seeds:
            continue
        acc = {c: [100 * r["test_acc"] for r in rs] for c, rs in picked.items()}
        mean = {c: statistics.mean(v) for c, v in acc.items()}
        gap = [f"{round(mean[('scl', d)] - mean[('modelpruning', d)], 2) + 0.0:+.2f}" for d in (False, True)]
        lines.append(
            f"| {NAMES[model]} | {100 * target:.1f} | {', '.join(map(str, seeds))} | {mean_std(acc[columns[0]])} | "
            f"{mean_std(acc[columns[1]])} | {gap[0]} | {mean_std(acc[columns[2]])} | {mean_std(acc[columns[3]])} | "
            f"{gap[1]} |"
        )
    if diverged:
        lines.append("")
        lines.append("Diverged, left out with their seed: " + "; ".join(diverged) + ".")
    return "\n".join(lines)


def ablations(runs: list[dict]) -> str:
    # The defaults' run is the side-by-side SCL run with the same model, density and epochs as the ablations.
    ablated = [r for r in runs if str(r.get("tag", "")).startswith("ablation:")]
    keys = {(r["model"], r["target_density"], r["epochs"]) for r in ablated}
    defaults = [
        r | {"tag": "ablation:defaults"}
        for r in runs
        if r.get("tag") == "side_by_side"
        and r["method"] == "scl"
        and (r["model"], r["target_density"], r["epochs"]) in keys
    ]
    rows = defaults + ablated
    lines = [
        "| ablation | setting | test acc % | density % | FLOPs % | seeds | epochs |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        cfg = r["config"]
        # Runs recorded before an option existed ran with what is now its "off" value.
        setting = f"ste={cfg['ste']}, normalize={cfg['normalize']} per {cfg.get('normalize_over') or 'unit'}"
        setting += f", mask_lr={cfg['mask_lr']}, init={cfg['mask_init']}"
        setting += f", regularizer={cfg['regularizer']}, fan_in_exponent={cfg.get('fan_in_exponent') or 0:g}"
        setting += f", freeze={cfg.get('freeze')}, density={100 * r['target_density']:g}%"
        if cfg.get("mask_lr_schedule", "constant") != "constant":
            setting += f", mask_lr_schedule={cfg['mask_lr_schedule']}"
        if cfg.get("no_protect"):
            setting += ", protect_pruned_weights=False"
        if cfg.get("ste_slope") is not None:
            setting += f", ste_slope={cfg['ste_slope']}"
        _add_once_per_seed(groups[(setting, r["epochs"])], r)
    named = []
    for (setting, epochs), rs in groups.items():
        # An ablation run that happens to use every default setting (e.g. an extra seed) joins the defaults row.
        tags = {r["tag"][len("ablation:") :] for r in rs}
        named.append(("defaults" if "defaults" in tags else sorted(tags)[0], setting, epochs, rs))
    for name, setting, epochs, rs in sorted(named, key=lambda row: row[:3]):
        acc = [100 * r["test_acc"] for r in rs]
        dens = [100 * r["density"] for r in rs]
        seeds = ", ".join(str(r["seed"]) for r in rs)
        row = f"| {name} | {setting} | {mean_std(acc)} | {mean_std(dens)} | {_mean_flops(rs)} | {seeds} | {epochs} |"
        lines.append(row)
    return "\n".join(lines)


def tuning(runs: list[dict]) -> str:
    """Runs tagged ``tune:<name>``: training settings, ranked by validation accuracy, never by test accuracy.

    The test column is shown for the record only; the choice of what to run longer is made on the validation column.
    A dense run with a setting's tag shows what the setting does without pruning.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        if str(r.get("tag", "")).startswith("tune:") and r.get("val_acc") is not None:
            key = (r["tag"][len("tune:") :], r["model"], r["target_density"] or 1.0, r["epochs"])
            _add_once_per_seed(groups[key], r)
    lines = [
        "| setting | model | target density % | epochs | activation | optimizer | lr | weight decay | label smoothing "
        "| batch | ramp / freeze | layer floor | teacher: weight / T | start | val acc % | test acc % | density % "
        "| seeds |",
        "|---|---|---:|---:|---|---|---:|---:|---:|---:|---|---:|---|---|---:|---:|---:|---|",
    ]
    ranked = sorted(groups.items(), key=lambda kv: -statistics.mean(r["val_acc"] for r in kv[1]))
    for (name, model, target, epochs), rs in sorted(ranked, key=lambda kv: (kv[0][1], kv[0][2], kv[0][3])):
        cfg = rs[0]["config"]
        val = mean_std([100 * r["val_acc"] for r in rs])
        test = mean_std([100 * r["test_acc"] for r in rs])
        dens = mean_std([100 * r["density"] for r in rs])
        seeds = ", ".join(str(r["seed"]) for r in rs)
        dense = rs[0]["method"] == "dense"
        magnitude = rs[0]["method"] == "modelpruning"  # a pruning ramp, but no masks to freeze
        schedule = "-" if dense else f"{cfg['ramp']:g} / {'-' if magnitude else cfg.get('freeze')}"
        floor = "-" if dense else f"{cfg.get('min_density_per_layer', 0):g}"
        teacher = f"{cfg['distill_alpha']:g} / {cfg['distill_temperature']:g}" if cfg.get("teacher") else "-"
        start = "trained dense" if cfg.get("init_from") else "random"
        lines.append(
            f"| {name}{' (ModelPruning)' if magnitude else ''} | {NAMES[model]} | "
            f"{'100 (dense)' if dense else f'{100 * target:g}'} | {epochs} | "
            f"{cfg.get('activation', 'relu')} | {cfg.get('optimizer', 'sgd')} | {cfg['lr']:g} | "
            f"{cfg['weight_decay']:g} | {cfg.get('label_smoothing', 0.0):g} | {cfg['batch_size']} | {schedule} | "
            f"{floor} | {teacher} | {start} | {val} | {test} | {dens} | {seeds} |"
        )
    return "\n".join(lines)


def elu(path: Path, plot_path: Path | None) -> str:
    data = json.loads(path.read_text())
    curves: dict[str, list[list[dict]]] = defaultdict(list)
    for run in data["runs"]:
        curves[run["variant"]].append(run["curve"])
    epochs = min(len(c) for cs in curves.values() for c in cs)
    lines = [
        "| variant | "
        + " | ".join(f"loss ep{e + 1}" for e in range(epochs))
        + " | test acc % | median unit mean act |",
        "|---|" + "---:|" * (epochs + 2),
    ]
    for variant, cs in curves.items():
        # Earlier epochs as means; the last epoch with the seed spread, which is what the claims are judged on.
        losses = [f"{statistics.mean(c[e]['train_loss'] for c in cs):.4f}" for e in range(epochs - 1)]
        losses.append(mean_std([c[epochs - 1]["train_loss"] for c in cs], digits=4))
        acc = mean_std([100 * c[epochs - 1]["test_acc"] for c in cs])
        act = mean_std([c[epochs - 1]["median_unit_mean_act"] for c in cs], digits=3)
        lines.append(f"| {variant} | " + " | ".join(losses) + f" | {acc} | {act} |")
    if plot_path is not None:
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant, cs in curves.items():
            ax.plot(
                range(1, epochs + 1),
                [statistics.mean(c[e]["train_loss"] for c in cs) for e in range(epochs)],
                marker="o",
                label=variant,
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss (epoch mean)")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot_path, dpi=120)
        plt.close(fig)
    seeds = sorted({run["seed"] for run in data["runs"]})
    spread = "; last-epoch cells: mean +- standard deviation over seeds" if len(seeds) > 1 else ""
    return f"Seeds {seeds}, mean over seeds{spread}; settings in `{path.name}`.\n\n" + "\n".join(lines)


def summarize(results: Path) -> None:
    """Write every summary table and plot for the result files in ``results``."""
    runs = _load(results / "mnist_pruning.jsonl")
    if runs:
        (results / "mnist_headline.md").write_text(headline(runs) + "\n")
        (results / "mnist_side_by_side.md").write_text(side_by_side(runs, results / "mnist_pareto.png") + "\n")
        (results / "mnist_ablations.md").write_text(ablations(runs) + "\n")
        (results / "mnist_flops.md").write_text(flops_tradeoff(runs, results / "mnist_flops.png") + "\n")
        if any(r.get("tag") == "side_by_side_augmented" for r in runs):
            table = side_by_side(runs, results / "mnist_pareto_augmented.png", augmented=True)
            (results / "mnist_side_by_side_augmented.md").write_text(table + "\n")
        if any(r.get("tag") == "side_by_side_augmented_e50" for r in runs):
            table = side_by_side(runs, None, augmented=True, tag="side_by_side_augmented_e50")
            (results / "mnist_side_by_side_augmented_50_epochs.md").write_text(table + "\n")
        if any(r.get("tag") == "kd" for r in runs):
            (results / "mnist_distillation.md").write_text(distillation(runs) + "\n")
        if any(r.get("tag") == "side_by_side_e60" for r in runs):
            table = side_by_side(runs, None, tag="side_by_side_e60")
            (results / "mnist_side_by_side_60_epochs.md").write_text(table + "\n")
        if any(r.get("tag") == "side_by_side_exact" for r in runs):
            (results / "mnist_exact_density.md").write_text(exact_density(runs) + "\n")
        if any(str(r.get("tag", "")).startswith("tune:") for r in runs):
            (results / "mnist_tuning.md").write_text(tuning(runs) + "\n")
    for net in ("mlp", "cnn"):
        path = results / f"elu_{net}.json"
        if path.exists():
            (results / f"elu_{net}.md").write_text(elu(path, results / f"elu_{net}.png") + "\n")
    print(f"summaries written to {results}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if not args.smoke:
        summarize(args.results)
        return
    with tempfile.TemporaryDirectory() as tmp:
        results = Path(tmp)
        fake = {"model": "lenet300", "target_density": 0.02, "density": 0.02, "test_acc": 0.98, "seed": 0}
        fake |= {"epochs": 1, "config": {"ste": "identity", "normalize": "mean_abs", "mask_lr": 0.01}}
        fake["config"] |= {"mask_init": 1.0, "regularizer": "connections"}
        # The SCL side of both side-by-side tables comes from the headline runs, as in the committed results.
        lines = [fake | {"method": "scl", "tag": "headline"}, fake | {"method": "modelpruning", "tag": "side_by_side"}]
        lines.append(fake | {"method": "scl", "tag": "ablation:smoke"})
        shifted = fake | {"config": fake["config"] | {"max_shift": 2}}
        lines += [shifted | {"method": "scl", "tag": "augmented"}]
        lines += [shifted | {"method": "modelpruning", "tag": "side_by_side_augmented"}]
        lines.append(fake | {"method": "scl", "tag": "tune:smoke", "val_acc": 0.98, "config": fake["config"] | RECIPE})
        exact = fake["config"] | {"exact_density": True}
        lines.append(fake | {"method": "scl", "tag": "side_by_side_exact", "config": exact})
        lines += [fake | {"method": m, "tag": "kd", "config": exact} for m in ("scl", "modelpruning")]
        (results / "mnist_pruning.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        summarize(results)
        paired_tables = (
            "mnist_side_by_side.md",
            "mnist_side_by_side_augmented.md",
            "mnist_exact_density.md",
            "mnist_distillation.md",
        )
        for name in paired_tables:
            if "| +0.00 |" not in (results / name).read_text():
                raise SystemExit(f"smoke: {name} does not pair the SCL run with the ModelPruning run")


if __name__ == "__main__":
    main(sys.argv[1:])
