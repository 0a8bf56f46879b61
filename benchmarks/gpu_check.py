"""GPU path check: SCL with bf16-mixed, torch.compile (inductor) and FSDP on a small model, in one command.

Prints one ``PASS``/``FAIL`` line per feature and the median step-time ratio SCL / dense, and writes the same as
JSON (``--out``). GPU time comes in short windows, so everything runs from this one script in a few minutes:

    python benchmarks/gpu_check.py --out gpu_check.json

Without CUDA it prints ``SKIPPED`` for every feature and exits 0 (``--require-gpu`` makes that an error); CI runs
``--smoke``, which only checks that the script imports and its model builds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_scl.callbacks.scl import SparseConnectivityLearning
from lightning_scl.models import ImageClassifier


def _data(n: int = 1024, shape=(3, 32, 32)) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)), 128)


class _Timer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.cuda.synchronize()
        if batch_idx >= 3:
            self.times.append(time.perf_counter() - self._t)


def _fit(scl: bool, steps: int = 16, compile_model: bool = False, **trainer_kwargs) -> tuple[dict, list[float]]:
    torch.manual_seed(0)
    model = ImageClassifier("resnet20", lr=0.05)
    callback = SparseConnectivityLearning(lam=0.2, mask_lr=0.05) if scl else None
    timer = _Timer()
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        max_steps=steps,
        callbacks=[c for c in (callback, timer) if c is not None],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(torch.compile(model) if compile_model else model, _data())
    info = {"steps": trainer.global_step}
    if callback is not None:
        info["density"] = callback.density
        info["mask_dtypes"] = sorted({str(m.mask.dtype) for m in callback.masks.values()})
    return info, timer.times


def check(name: str, fn) -> dict:
    try:
        detail = fn()
        ok = bool(detail.pop("ok"))
        return {"feature": name, "status": "PASS" if ok else "FAIL", **detail}
    except Exception as err:  # report every feature, whatever breaks
        return {
            "feature": name,
            "status": "FAIL",
            "error": f"{type(err).__name__}: {err}",
            "trace": traceback.format_exc()[-1500:],
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--require-gpu", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="CI without GPU: build the model, run nothing")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.smoke:
        ImageClassifier("resnet20")
        print("gpu_check smoke: model builds; GPU features not run")
        return 0
    features = ["bf16-mixed", "torch.compile", "fsdp", "step-time ratio"]
    if not torch.cuda.is_available():
        for feature in features:
            print(f"SKIPPED  {feature}: no CUDA device")
        return 1 if args.require_gpu else 0

    def bf16():
        info, _ = _fit(scl=True, precision="bf16-mixed")
        return {"ok": info["mask_dtypes"] == ["torch.float32"] and info["density"] < 1.0, **info}

    def compiled():
        eager_info, _ = _fit(scl=True, steps=8)
        comp_info, _ = _fit(scl=True, steps=8, compile_model=True)
        return {"ok": comp_info["density"] == eager_info["density"] < 1.0, "eager": eager_info, "compiled": comp_info}

    def fsdp():
        from lightning.pytorch.strategies import FSDPStrategy

        info, _ = _fit(scl=True, strategy=FSDPStrategy(use_orig_params=True))
        return {"ok": info["density"] < 1.0 and info["steps"] == 16, **info}

    def ratio():
        dense, scl = [], []
        for _ in range(3):
            dense += _fit(scl=False, steps=40)[1]
            scl += _fit(scl=True, steps=40)[1]
        r = statistics.median(scl) / statistics.median(dense)
        return {"ok": r <= 1.10, "scl_over_dense": round(r, 3), "dense_ms": 1000 * statistics.median(dense)}

    results = [check(n, f) for n, f in zip(features, (bf16, compiled, fsdp, ratio))]
    for r in results:
        extra = {k: v for k, v in r.items() if k not in ("feature", "status", "trace")}
        print(f"{r['status']:<5} {r['feature']}: {extra}")
    meta = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    print(json.dumps(meta))
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0 if all(r["status"] == "PASS" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
