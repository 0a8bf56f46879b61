"""lightning_scl: learn sparse connectivity (SCL) and swap ReLU for ELU with PyTorch Lightning callbacks.

The public API, in four verbs plus two callbacks:

- prepare: :class:`SparseConnectivityLearning` (or :func:`inject_masks` outside Lightning), :class:`ELUSwap`
  (or :func:`swap_activations` / :func:`apply_elu`);
- train: any ``Trainer``; the callback handles the masks' optimizer, normalization and regularizer;
- measure: :func:`sparsity_report`;
- strip and ship: :func:`export_pruned`, :func:`load_pruned`, :func:`shrink_model`, :func:`load_shrunk`.

Data modules live in :mod:`lightning_scl.data`, the papers' networks in :mod:`lightning_scl.models`.

Example:
    >>> import lightning_scl
    >>> callback = lightning_scl.SparseConnectivityLearning(target_density=0.05)
    >>> callback.target_density
    0.05
"""

from lightning_scl.accounting import sparsity_report
from lightning_scl.activations import apply_elu, restore_activations, swap_activations
from lightning_scl.callbacks.elu import ELUSwap
from lightning_scl.callbacks.scl import SparseConnectivityLearning
from lightning_scl.export import export_pruned, load_pruned, load_shrunk, shrink_model
from lightning_scl.masking import (
    ConnectivityMask,
    count_connections,
    fold_state_dict,
    has_masks,
    inject_masks,
    iter_masks,
    strip_masks,
)

__version__ = "0.1.0"

__all__ = [
    "ConnectivityMask",
    "ELUSwap",
    "SparseConnectivityLearning",
    "__version__",
    "apply_elu",
    "count_connections",
    "export_pruned",
    "fold_state_dict",
    "has_masks",
    "inject_masks",
    "iter_masks",
    "load_pruned",
    "load_shrunk",
    "restore_activations",
    "shrink_model",
    "sparsity_report",
    "strip_masks",
    "swap_activations",
]
