"""A fit that can be SIGKILLed mid-epoch and resumed with ``ckpt_path="last"``; used by tests/test_kill_resume.py.

``python tests/scripts/kill_resume_fit.py {straight|interrupted|resume} OUT_DIR``. Each run dumps what it ended with
(mask and weight digests, lambda, the last logged density) to ``OUT_DIR/<mode>.json``; ``interrupted`` writes the
global step to ``OUT_DIR/progress_<mode>`` after every step and sleeps a little so the test can kill it mid-epoch.
"""

import csv
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_scl.callbacks.scl import SparseConnectivityLearning
from tests.conftest import MLP, blobs

STEPS_PER_EPOCH = 16


class ResumableLoader:
    """Fixed-order batches; after a mid-epoch resume the first epoch starts at the batch after the checkpoint.

    Lightning saves a stateful loader's state, but its one-batch prefetch makes "yielded" run one ahead of
    "trained on"; the number of completed batches is the checkpoint's own progress counter, so the script passes it in.
    """

    def __init__(self, skip: int = 0):
        data = blobs(n=STEPS_PER_EPOCH * 32)
        self.batches = [(data.tensors[0][i : i + 32], data.tensors[1][i : i + 32]) for i in range(0, len(data), 32)]
        self.skip = skip

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return self._batches()

    def _batches(self):
        # A generator: Lightning may call iter() before the epoch starts; the skip applies to the first real pass.
        start, self.skip = self.skip, 0
        yield from self.batches[start:]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class Progress(Callback):
    def __init__(self, path: Path, delay: float):
        self.path, self.delay = path, delay

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(str(trainer.global_step))
        os.replace(tmp, self.path)  # the test polls this file: never let it see a half-written one
        time.sleep(self.delay)


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(mode: str, out: Path) -> None:
    L.seed_everything(0)
    torch.set_num_threads(1)
    ckpt_dir = out / ("ckpt_straight" if mode == "straight" else "ckpt")
    skip, ckpt_path = 0, None
    if mode == "resume":
        ckpt_path = "last"
        skip = torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] % STEPS_PER_EPOCH
    scl = SparseConnectivityLearning(target_density=0.3, mask_lr=0.05)
    callbacks = [
        scl,
        ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=5, save_top_k=-1),
        Progress(out / f"progress_{mode}", delay=0.15 if mode == "interrupted" else 0.0),
    ]
    logger = CSVLogger(out, name=f"logs_{mode}", version=0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=3,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=1,
        deterministic=True,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = MLP(weight_decay=1e-3)
    trainer.fit(model, ResumableLoader(skip), ckpt_path=ckpt_path)
    with open(Path(logger.log_dir) / "metrics.csv") as fh:
        densities = [float(r["scl/density"]) for r in csv.DictReader(fh) if r.get("scl/density")]
    record = {
        "masks": digest(m.mask for m in scl.masks.values()),
        "weights": digest(p for n, p in model.named_parameters() if "mask" not in n),
        "lam": scl.lam,
        "steps": trainer.global_step,
        "last_logged_density": densities[-1],
        "resumed_from": skip,
    }
    (out / f"{mode}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
