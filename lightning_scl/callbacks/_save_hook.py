"""Checkpoint records that also reach weights-only checkpoints.

Lightning skips ``Callback.on_save_checkpoint`` for weights-only checkpoints (``ModelCheckpoint(save_weights_only=
True)``, ``trainer.save_checkpoint(path, weights_only=True)``) but still calls ``LightningModule.on_save_checkpoint``.
A weights-only checkpoint without the ``lightning_scl`` records would be rebuilt as the unswapped model (ReLU for a
network trained with ELU) by the loaders and exports. So each callback also writes its record from the module's hook,
through one shared stand-in that the callbacks of a run register with.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import lightning.pytorch as L

RecordWriter = Callable[[dict[str, Any]], None]


class _WriteRecordsOnSave:
    """Stands in for ``pl_module.on_save_checkpoint``: writes the registered records, then calls the original.

    ``__wrapped__`` is the user's original method, so Lightning's ``is_overridden`` still sees an override.
    """

    def __init__(self, pl_module: L.LightningModule) -> None:
        self.pl_module = pl_module
        self.previous: Callable[[dict[str, Any]], Any] = pl_module.on_save_checkpoint
        self.had_instance_attr = "on_save_checkpoint" in pl_module.__dict__
        self.__wrapped__ = inspect.unwrap(self.previous)
        self.writers: dict[int, RecordWriter] = {}

    @property
    def __code__(self) -> Any:
        return self.__wrapped__.__code__

    def __call__(self, checkpoint: dict[str, Any]) -> Any:
        for write in list(self.writers.values()):
            write(checkpoint)
        return self.previous(checkpoint)

    def __deepcopy__(self, memo: dict[int, Any]) -> _WriteRecordsOnSave:
        # Shared like a function: a copy of the model (EMA's AveragedModel) must not deep-copy the callbacks.
        return self

    def remove(self) -> None:
        # Under another wrapper put on top of this one, stay as a pass-through: removing would drop that one too.
        if self.pl_module.__dict__.get("on_save_checkpoint") is self:
            if self.had_instance_attr:
                self.pl_module.__dict__["on_save_checkpoint"] = self.previous
            else:
                del self.pl_module.__dict__["on_save_checkpoint"]


def register_record_writer(pl_module: L.LightningModule, owner: object, write: RecordWriter) -> None:
    """Have ``write(checkpoint)`` run on every checkpoint of ``pl_module``, weights-only ones included."""
    patch = _active_patch(pl_module)
    if patch is None:
        patch = _WriteRecordsOnSave(pl_module)
        pl_module.__dict__["on_save_checkpoint"] = patch
    patch.writers[id(owner)] = write


def unregister_record_writer(pl_module: L.LightningModule, owner: object) -> None:
    """Undo :func:`register_record_writer` for ``owner``; the stand-in goes once no callback is registered."""
    patch = _active_patch(pl_module)
    if patch is None:
        return
    patch.writers.pop(id(owner), None)
    if not patch.writers:
        patch.remove()


def _active_patch(pl_module: L.LightningModule) -> _WriteRecordsOnSave | None:
    method = pl_module.__dict__.get("on_save_checkpoint")
    while method is not None:  # possibly under other wrappers
        if isinstance(method, _WriteRecordsOnSave):
            return method if method.writers or method.pl_module.__dict__.get("on_save_checkpoint") is method else None
        method = getattr(method, "__wrapped__", None)
    return None
