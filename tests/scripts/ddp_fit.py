"""Two-process CPU DDP fit with SparseConnectivityLearning (and ELUSwap); each rank dumps what it ended with.

Run by tests/test_distributed.py as ``python tests/scripts/ddp_fit.py OUT_DIR [mlp|gan]``; Lightning re-launches
this script for rank 1, so everything lives under the ``__main__`` guard. ``gan``: manual optimization with two
optimizers and ``toggle_optimizer``, which DDP runs with ``find_unused_parameters`` (as without SCL).
"""

import hashlib
import json
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_scl.callbacks.scl import SparseConnectivityLearning
from tests.conftest import GAN, MLP, gan_data, loader


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(out_dir: Path, kind: str) -> None:
    L.seed_everything(0)
    torch.set_num_threads(1)
    gan = kind == "gan"
    model = GAN(weight_decay=1e-3) if gan else MLP(weight_decay=1e-3)
    callbacks = [SparseConnectivityLearning(target_density=0.3, mask_lr=0.05)]
    if not gan:
        from lightning_scl.callbacks.elu import ELUSwap

        callbacks.append(ELUSwap())
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_find_unused_parameters_true" if gan else "ddp",
        max_epochs=3,
        callbacks=callbacks,
        logger=CSVLogger(out_dir, name="logs", version=0),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, gan_data(n=512, batch_size=32) if gan else loader(n=512))
    scl = callbacks[0]
    record = {
        "rank": trainer.global_rank,
        "masks": digest(m.mask for m in scl.masks.values()),
        "weights": digest(p for n, p in model.named_parameters() if "mask" not in n),
        "lam": scl.lam,
        "density": scl.density,
        "kept": sum(m.kept() for m in scl.masks.values()),
        "connections": sum(m.numel_connections for m in scl.masks.values()),
        "steps": trainer.global_step,
        "swapped": [type(m).__name__ for m in model.modules() if "ELU" in type(m).__name__],
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "mlp")
