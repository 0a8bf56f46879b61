"""Lightning callbacks: thin adapters from Lightning hooks to the pure-torch pieces."""

from lightning_scl.callbacks.elu import ELUSwap
from lightning_scl.callbacks.scl import SparseConnectivityLearning

__all__ = ["ELUSwap", "SparseConnectivityLearning"]
