"""MNIST pruning quality: SCL against Lightning's ModelPruning (gradual global L1) and the dense baseline.

Every run trains ``ImageClassifier`` on ``MNISTDataModule`` (55k train / 5k validation carved from the training set,
or all 60k with ``--val-size 0`` once settings are chosen; the 10k test set is only used for the final number, never
for selection) with the same optimizer, schedule and epochs; only the pruning callback differs:

- ``scl``: ``SparseConnectivityLearning(target_density=d, ...)``;
- ``modelpruning``: ``lightning.pytorch.callbacks.ModelPruning`` global L1 unstructured over the same layers, cubic
  gradual schedule (Zhu & Gupta) over the first ``--ramp`` of the epochs, then fine-tuning;
- ``dense``: no pruning.

Each run appends one JSON line to ``--out`` (default ``benchmarks/results/mnist_pruning.jsonl``);
``benchmarks/summarize.py`` turns the lines into tables and plots.

Usage::

    python benchmarks/mnist_pruning.py --model lenet300 --method scl --density 0.015 --epochs 60 --seeds 0 1 2
    python benchmarks/mnist_pruning.py --model lenet5 --method modelpruning --density 0.02 --epochs 20
    python benchmarks/mnist_pruning.py --smoke      # CI: a few steps on a data subset, writes nothing

Distillation from a dense teacher (both methods alike): train the teacher with ``--method dense --save-model T.pt``,
then pass ``--teacher T.pt`` (``--distill-alpha``, ``--distill-temperature``).

Pruning a trained network, as the published methods do (Han et al., DNS and Sparse VD all start from a trained dense
network): train it with ``--method dense --save-model D.pt``, then pass ``--init-from D.pt``. The run then starts
from those weights instead of a random initialization; the epochs count only the pruning run.

Retraining with the learning rate rewound (Renda et al. 2020; Han et al. 2015 also retrain after pruning):
``--retrain-epochs K`` fixes the connections the run kept and trains the sparse network K more epochs with the
learning-rate schedule restarted (``torch.nn.utils.prune`` holds the pruned weights at zero). ``--epochs`` counts the
pruning run only; the budget is the sum of the two.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelPruning
from torch import nn
from torch.nn.utils import prune

from lightning_scl.activations import swap_activations
from lightning_scl.callbacks.elu import ELUSwap
from lightning_scl.callbacks.scl import SparseConnectivityLearning
from lightning_scl.data import MNISTDataModule
from lightning_scl.export import plain_copy
from lightning_scl.masking import count_connections
from lightning_scl.models import ImageClassifier

RESULTS = Path(__file__).parent / "results"


def cubic_density(progress: float, target: float) -> float:
    """Density of the gradual schedule at ``progress`` in [0, 1] of the pruning ramp (Zhu & Gupta 2017)."""
    progress = min(max(progress, 0.0), 1.0)
    return target + (1.0 - target) * (1.0 - progress) ** 3


def modelpruning_callback(model: ImageClassifier, target: float, epochs: int, ramp: float) -> ModelPruning:
    """Global L1 unstructured pruning at every epoch end until ``ramp * epochs``, then fine-tuning."""
    ramp_epochs = max(1, round(ramp * epochs))
    layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]

    def amount(epoch: int) -> float:
        # ModelPruning prunes `amount` of the weights still unpruned at the end of `epoch`.
        if epoch >= ramp_epochs:
            return 0.0
        before = cubic_density(epoch / ramp_epochs, target)
        after = cubic_density((epoch + 1) / ramp_epochs, target)
        return 1.0 - after / before

    return ModelPruning(
        "l1_unstructured",
        parameters_to_prune=layers,
        amount=amount,
        use_global_unstructured=True,
        make_pruning_permanent=True,
        verbose=0,
    )


class DistilledClassifier(ImageClassifier):
    """``ImageClassifier`` whose training loss also matches a fixed teacher's softened outputs (Hinton et al. 2015).

    ``loss = (1 - alpha) * CE(y) + alpha * T^2 * KL(teacher_T || student_T)``, CE being ``ImageClassifier``'s own
    training loss (with its label smoothing, if any). The teacher is kept outside the module tree (and out of the
    hyperparameters) so no pruning callback masks it and no optimizer sees it.
    """

    def __init__(self, *args: Any, alpha: float, temperature: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.alpha, self.temperature = alpha, temperature
        self._teacher: list[nn.Module] = []

    def set_teacher(self, teacher: nn.Module) -> None:
        self._teacher = [teacher.eval().requires_grad_(False)]

    def on_fit_start(self) -> None:
        # Outside the module tree, the teacher is not moved by Lightning: follow the student's device.
        self._teacher[0].to(self.device)

    def training_loss(self, logits: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            soft_targets = F.log_softmax(self._teacher[0](batch[0]) / self.temperature, dim=1)
        student = F.log_softmax(logits / self.temperature, dim=1)
        distill = F.kl_div(student, soft_targets, log_target=True, reduction="batchmean")
        return (1 - self.alpha) * super().training_loss(logits, batch) + self.alpha * self.temperature**2 * distill


def quiet_trainer(epochs: int, max_steps: int, callbacks: list[L.Callback], smoke: bool) -> L.Trainer:
    """A CPU trainer without logger, checkpoints or progress output (the script prints one JSON line per run)."""
    return L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0 if smoke else None,
    )


def retrain(
    model: ImageClassifier, data: L.LightningDataModule, epochs: int, smoke: bool = False
) -> tuple[ImageClassifier, L.Trainer]:
    """Train the pruned ``model`` ``epochs`` more with its connections fixed and the learning-rate schedule restarted.

    Works on a plain copy (SCL's masks folded into zeros; ModelPruning's are already), so no pruning callback runs and
    the masks cannot move: ``prune.custom_from_mask`` holds every pruned weight at zero and gives it no gradient.
    """
    sparse = plain_copy(model)
    layers = [m for m in sparse.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and bool((m.weight == 0).any())]
    for layer in layers:
        prune.custom_from_mask(layer, "weight", layer.weight != 0)
    trainer = quiet_trainer(epochs, 6 if smoke else -1, [], smoke)
    trainer.fit(sparse, data)
    for layer in layers:
        prune.remove(layer, "weight")
    return sparse, trainer


def weight_density(model: nn.Module) -> float:
    """Kept fraction over Linear/Conv weights: SCL masks, or exact zeros after ModelPruning / for dense."""
    kept, total = count_connections(model)
    if total:
        return kept / total
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def layer_densities(model: nn.Module) -> dict[str, float]:
    """Kept fraction per Linear/Conv layer (the effective weight ``W * H(m)`` for SCL, exact zeros otherwise)."""
    return {
        name: round(float((module.weight != 0).float().mean()), 5)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
    }


def run(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    L.seed_everything(seed, workers=True)
    data = MNISTDataModule(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        seed=seed,
        train_subset=args.train_subset,
        max_shift=args.max_shift,
        val_size=args.val_size,
    )
    options: dict[str, Any] = dict(
        lr=args.lr,
        momentum=0.9,
        weight_decay=args.weight_decay,
        nesterov=True,
        optimizer=args.optimizer,
        label_smoothing=args.label_smoothing,
    )
    if args.teacher is not None:
        teacher = ImageClassifier(args.model)
        teacher.load_state_dict(torch.load(args.teacher, weights_only=True))
        if args.activation == "elu":  # the teacher was trained with the student's activation
            swap_activations(teacher, alpha=1.0, quiet=True)
        model: ImageClassifier = DistilledClassifier(
            args.model, alpha=args.distill_alpha, temperature=args.distill_temperature, **options
        )
        model.set_teacher(teacher.model)
    else:
        model = ImageClassifier(args.model, **options)
    if args.init_from is not None:
        model.load_state_dict(torch.load(args.init_from, weights_only=True))
    callbacks: list[L.Callback] = []
    if args.activation == "elu":
        callbacks.append(ELUSwap(alpha=1.0, verbose=False))
    scl: SparseConnectivityLearning | None = None
    if args.method == "scl":
        callbacks.append(
            scl := SparseConnectivityLearning(
                lam=args.lam,
                target_density=None if args.lam is not None else args.density,
                ramp_end=args.ramp,
                freeze_masks_at=None if args.no_freeze else args.freeze,
                mask_lr=args.mask_lr,
                mask_momentum=args.mask_momentum,
                mask_lr_schedule=args.mask_lr_schedule,
                protect_pruned_weights=not args.no_protect,
                mask_init=args.mask_init,
                ste=args.ste,
                normalize=args.normalize,
                normalize_over=args.normalize_over,
                regularizer=args.regularizer,
                fan_in_exponent=args.fan_in_exponent,
                min_density_per_layer=args.min_density_per_layer,
                exact_density=not args.no_exact_density,
            )
        )
        if args.ste_slope is not None:
            # Set after construction: the constructor rejects a non-positive proxy slope, which is the point of
            # the ablation (showing that an invalid proxy fails).
            scl.ste_slope = args.ste_slope
    elif args.method == "modelpruning":
        callbacks.append(modelpruning_callback(model, args.density, args.epochs, args.ramp))
    if args.ema is not None:  # after SCL, which keeps the masks out of the average
        callbacks.append(EMAWeightAveraging(decay=args.ema))
    trainer = quiet_trainer(args.epochs, args.max_steps, callbacks, args.smoke)
    start = time.perf_counter()
    trainer.fit(model, data)
    if args.retrain_epochs:
        model, trainer = retrain(model, data, args.retrain_epochs, args.smoke)
    fit_seconds = time.perf_counter() - start
    if args.save_model is not None:
        torch.save(model.state_dict(), args.save_model)
    # The last epoch's validation accuracy: the number hyperparameters are chosen by (never the test accuracy).
    val_acc = trainer.callback_metrics.get("val/acc")
    # The last epoch's mean training accuracy: tells underfitting from overfitting.
    train_acc = trainer.callback_metrics.get("train/acc")
    test = trainer.test(model, data, verbose=False)[0]
    return {
        "model": args.model,
        "method": args.method,
        "target_density": None if args.method == "dense" or args.lam is not None else args.density,
        "density": weight_density(model),
        "layer_density": layer_densities(model),
        "val_acc": None if val_acc is None else round(float(val_acc), 5),
        "train_acc": None if train_acc is None else round(float(train_acc), 5),
        "test_acc": test["test/acc"],
        "test_error_pct": 100 * (1 - test["test/acc"]),
        "seed": seed,
        "epochs": args.epochs,
        "fit_seconds": round(fit_seconds, 1),
        "config": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("seeds", "out", "data_dir", "smoke", "save_model")
        }
        | (
            {
                "fan_in_exponent": scl.fan_in_exponent,
                "normalize_over": scl.normalize_over,
                "exact_density": scl.exact_density,
            }
            if scl is not None
            else {}
        ),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["lenet300", "lenet5"], default="lenet300")
    parser.add_argument("--method", choices=["scl", "modelpruning", "dense"], default="scl")
    parser.add_argument("--density", type=float, default=0.02, help="target fraction of weights kept")
    parser.add_argument("--lam", type=float, default=None, help="SCL: fixed regularizer strength instead of --density")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd", help="optimizer of the weights")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="label smoothing of the training loss")
    parser.add_argument("--ramp", type=float, default=0.6, help="fraction of training over which density ramps down")
    parser.add_argument("--freeze", type=float, default=0.7, help="SCL: freeze masks after this fraction")
    parser.add_argument("--no-freeze", action="store_true", help="SCL: never freeze the masks (freeze_masks_at=None)")
    parser.add_argument(
        "--no-exact-density", action="store_true", help="SCL: exact_density=False (keep the controller's density)"
    )
    parser.add_argument("--mask-lr", type=float, default=0.01)
    parser.add_argument("--mask-momentum", type=float, default=0.9)
    parser.add_argument("--no-protect", action="store_true", help="SCL: protect_pruned_weights=False")
    parser.add_argument("--mask-lr-schedule", choices=["constant", "cosine"], default="constant")
    parser.add_argument("--mask-init", type=float, default=1.0)
    parser.add_argument("--ste", default="identity")
    parser.add_argument("--ste-slope", type=float, default=None, help="leaky_relu proxy slope (may be invalid)")
    parser.add_argument("--normalize", default="mean_abs")
    parser.add_argument(
        "--normalize-over", choices=["unit", "layer", "network"], default=None, help="SCL: default if None"
    )
    parser.add_argument("--regularizer", default="connections")
    parser.add_argument("--min-density-per-layer", type=float, default=0.0, help="SCL: per-layer density floor")
    parser.add_argument("--fan-in-exponent", type=float, default=None, help="SCL: None = the callback's default")
    parser.add_argument("--teacher", type=Path, default=None, help="distill from this dense state dict (--save-model)")
    parser.add_argument("--distill-alpha", type=float, default=0.5, help="weight of the distillation term")
    parser.add_argument("--distill-temperature", type=float, default=4.0)
    parser.add_argument(
        "--init-from", type=Path, default=None, help="start from this trained dense state dict (--save-model)"
    )
    parser.add_argument("--save-model", type=Path, default=None, help="write the trained model's state dict here")
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument(
        "--max-shift",
        type=int,
        default=0,
        help="random translation of training images, pixels (0: none, as the papers)",
    )
    parser.add_argument(
        "--activation",
        choices=["relu", "elu"],
        default="relu",
        help="elu: add the ELUSwap callback (alpha 1); a --teacher must have been trained with the same",
    )
    parser.add_argument(
        "--val-size",
        type=int,
        default=5000,
        help="validation images carved from the 60k training images (0: train on all 60k, no validation accuracy)",
    )
    parser.add_argument(
        "--ema", type=float, default=None, help="average the weights with EMAWeightAveraging(decay=EMA) (not MP)"
    )
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument(
        "--retrain-epochs",
        type=int,
        default=0,
        help="then train the pruned network this many more epochs, connections fixed, learning-rate schedule restarted",
    )
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", type=Path, default=RESULTS / "mnist_pruning.jsonl")
    parser.add_argument("--tag", default="", help="free-form label stored with the result (e.g. an ablation name)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 when two runs share 2 cores)")
    parser.add_argument("--smoke", action="store_true", help="CI: 2 epochs x 3 steps on 512 samples, no output")
    args = parser.parse_args(argv)
    if args.ema is not None and args.method == "modelpruning":
        parser.error("--ema with --method modelpruning: the average would mix pruned and unpruned weights")
    if args.retrain_epochs < 0:
        parser.error(f"--retrain-epochs must be 0 (no retraining) or more, got {args.retrain_epochs}")
    if args.no_freeze:
        args.freeze = None
    if args.smoke:
        args.epochs, args.max_steps, args.train_subset = 2, 6, 512
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    torch.set_num_threads(args.threads)
    for seed in args.seeds:
        result = run(args, seed)
        result["tag"] = args.tag
        line = json.dumps(result)
        print(line, flush=True)
        if not args.smoke:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as fh:
                fh.write(line + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
