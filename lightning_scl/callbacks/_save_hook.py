"""Checkpoint records that also reach weights-only checkpoints.

Lightning skips ``Callback.on_save_checkpoint`` for weights-only checkpoints (``ModelCheckpoint(save_weights_only=
True)``, ``trainer.save_checkpoint(path, weights_only=True)``) but still calls ``LightningModule.on_save_checkpoint``.
A weights-only checkpoint without the ``lightning_scl`` records would be rebuilt as the unswapped model (ReLU for a
network trained with ELU) by the loaders and exports. So each callback also has its record written from the module's
hook, through one shared stand-in.

The records describe the model as it is when saved (its masks, its swap), not a callback: the writers refer to the
model only, so the stand-in stays after ``fit`` (a weights-only save after training keeps the records), and a copy of
the model (EMA's ``AveragedModel``, a pickle) carries writers bound to the copy.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

RecordWriter = Callable[[dict[str, Any]], None]


class _WriteRecordsOnSave:
    """Stands in for ``module.on_save_checkpoint``: writes the registered records, then calls the original.

    ``__wrapped__`` is the user's original method, so Lightning's ``is_overridden`` still sees an override.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.previous: Callable[[dict[str, Any]], Any] = module.on_save_checkpoint
        self.__wrapped__ = inspect.unwrap(self.previous)
        self.writers: dict[str, RecordWriter] = {}

    @property
    def __code__(self) -> Any:
        return self.__wrapped__.__code__

    def __call__(self, checkpoint: dict[str, Any]) -> Any:
        for write in list(self.writers.values()):
            write(checkpoint)
        return self.previous(checkpoint)


def register_record_writer(module: nn.Module, kind: str, write: RecordWriter) -> None:
    """Have ``write(checkpoint)`` run on every checkpoint of ``module``, weights-only ones included.

    ``kind`` names the record (one writer per kind: a later callback of the same kind replaces the earlier one).
    ``write`` must refer to the model, not to a callback, since it stays with the model after ``fit``.
    """
    patch = _find_patch(module)
    if patch is None:
        patch = _WriteRecordsOnSave(module)
        module.__dict__["on_save_checkpoint"] = patch
    patch.writers[kind] = write


def _find_patch(module: nn.Module) -> _WriteRecordsOnSave | None:
    method = module.__dict__.get("on_save_checkpoint")
    while method is not None:  # possibly under other wrappers (functools.wraps sets __wrapped__)
        if isinstance(method, _WriteRecordsOnSave):
            return method if method.module is module else None
        method = getattr(method, "__wrapped__", None)
    return None
