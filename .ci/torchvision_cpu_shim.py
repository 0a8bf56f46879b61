"""CI only: let a CUDA build of torchvision import beside a CPU-only torch.

PyPI's Linux x86_64 torchvision wheels are CUDA builds: their compiled operators (``_C.so``) need libtorch_cuda, so
they do not load beside the CPU-only torch wheel that CI installs (PyPI's CUDA stack, 5.5 GB, filled a CI disk).
torchvision copes with a missing ``_C.so`` everywhere except one place: its import registers fake kernels for
``torchvision::nms`` and ``torchvision::qnms`` unconditionally, which fails with "operator torchvision::nms does not
exist", and ``import lightning`` fails with it (torchmetrics imports torchvision).

``.ci/run`` installs this module with a ``.pth`` line only after that exact failure. On the first import of
torchvision it tries to load the compiled operators itself; only where they cannot load does it declare the two
schemas, so that torchvision's pure-Python datasets, transforms and models (all this project uses) import.
``torchvision.ops.nms`` then raises torchvision's own "Couldn't load custom C++ ops" error if called; nothing in
lightning_scl calls it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path
from typing import Any

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY: Any = None  # the torch.library.Library holding the schemas; must outlive the import


class _DeclareMissingTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        global _LIBRARY
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("torchvision")
        if spec is None or spec.origin is None:
            return None
        import torch

        # torchvision 0.28 ships _C.so, 0.29 _C_stable.so; a layout not known here is left alone
        folder = Path(spec.origin).parent
        compiled = [path for path in folder.glob("*.so") if path.name.split(".")[0] in ("_C", "_C_stable")]
        try:
            for library in compiled:
                torch.ops.load_library(str(library))  # torchvision's own load of it is then a no-op
        except OSError:
            _LIBRARY = torch.library.Library("torchvision", "DEF")
            for schema in _SCHEMAS:
                _LIBRARY.define(schema)
        return None  # the regular finders import torchvision itself


sys.meta_path.insert(0, _DeclareMissingTorchvisionOps())
