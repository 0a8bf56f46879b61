"""ONNX export of the plain and the shrunk model, run in onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_scl.export import export_pruned

from .test_export import LeNet5, masked, resnet18

ort = pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small models: one thread is faster


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(np.asarray(output))


def test_onnx_plain_lenet5(tmp_path: Path) -> None:
    model = masked(LeNet5, 0.1)
    x = torch.randn(2, 1, 28, 28)
    path = export_pruned(model, tmp_path / "lenet5.onnx", format="onnx", example_input=x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet5.onnx"]  # one self-contained file
    with torch.no_grad():
        torch.testing.assert_close(run_onnx(path, x), model(x), rtol=1e-4, atol=1e-5)


def test_onnx_shrunk_resnet18(tmp_path: Path) -> None:
    model = masked(resnet18, 0.5, granularity="channel", seed=2)
    x = torch.randn(1, 3, 32, 32)
    plain = export_pruned(model, tmp_path / "dense.onnx", format="onnx", example_input=x)
    small = export_pruned(model, tmp_path / "small.onnx", format="onnx_shrunk", example_input=x)
    assert small.stat().st_size < 0.7 * plain.stat().st_size
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(run_onnx(small, x), expected, rtol=1e-4, atol=1e-4)
