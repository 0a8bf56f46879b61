"""lightning_scl: learn sparse connectivity (SCL) and swap ReLU for ELU with PyTorch Lightning callbacks."""

__version__ = "0.1.0"
