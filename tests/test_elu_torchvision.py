"""swap_activations on torchvision models: no ReLU left in a forward, and the same output as a hand-made ELU model."""

from __future__ import annotations

import contextlib
import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_scl.activations import PerCallSite, swap_activations

aten = torch.ops.aten
RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu6}
RELU_OPS = {aten.relu.default, aten.relu_.default, aten.hardtanh.default, aten.hardtanh_.default}
ELU_OPS = {aten.elu.default, aten.elu_.default}


class CountFunctions(TorchFunctionMode):
    """Counts ReLU-family calls at the Python level (what a module swap or the reroute mode must catch)."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.relu += func in RELU_FUNCTIONS
        return func(*args, **(kwargs or {}))


class CountOps(TorchDispatchMode):
    """Counts aten relu/hardtanh (ReLU6) and elu kernels actually run."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = self.elu = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.relu += func in RELU_OPS
        self.elu += func in ELU_OPS
        return func(*args, **(kwargs or {}))


def run_counted(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, CountFunctions, CountOps]:
    functions, ops = CountFunctions(), CountOps()
    with torch.no_grad(), functions, ops:
        return model(x), functions, ops


def elu_by_patching(model: nn.Module, x: torch.Tensor, relu6: bool = False) -> torch.Tensor:
    """Reference: the unswapped model with F.relu (and nn.ReLU6's F.hardtanh) patched to ELU."""

    def elu(t, *args, **kwargs):
        return F.elu(t)

    with torch.no_grad(), contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(F, "relu", elu))
        if relu6:
            stack.enter_context(mock.patch.object(F, "hardtanh", elu))
        return model(x)


def build(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards: one thread is faster


def test_resnet18_shared_relu_gets_one_elu_per_call_site():
    model = build("resnet18")
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    _, before, _ = run_counted(model, X)
    report = swap_activations(model)

    # one nn.ReLU per BasicBlock (called twice) plus the stem's
    assert before.relu == 17
    assert report.num_modules == 9 and report.num_call_sites == 17 and report.untraced == []
    block = model.layer1[0]
    assert isinstance(block.relu, PerCallSite) and len(block.relu.sites) == 2
    assert block.relu.sites[0] is not block.relu.sites[1]
    assert list(model.state_dict()) == keys

    out, functions, ops = run_counted(model, X)
    assert functions.relu == 0 and ops.relu == 0 and ops.elu == 17
    assert torch.equal(out, elu_by_patching(reference, X))


def test_resnet18_per_site_hooks_see_their_own_call():
    model = build("resnet18")
    swap_activations(model)
    block = model.layer1[0]
    seen: list[tuple[int, torch.Size]] = []
    for i, site in enumerate(block.relu.sites):
        site.register_forward_hook(lambda m, a, out, i=i: seen.append((i, out.shape)))
    with torch.no_grad():
        model(X)
        model(X)
    # site 0 after bn1, site 1 after the residual add, in that order, in every forward
    assert [i for i, _ in seen] == [0, 1, 0, 1]


@pytest.mark.parametrize(("name", "size", "calls"), [("googlenet", 64, 57), ("inception_v3", 75, 94)])
def test_functional_only_models(name, size, calls):
    model = build(name, aux_logits=False, init_weights=True)
    reference = copy.deepcopy(model)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    _, before, _ = run_counted(model, x)
    report = swap_activations(model)
    assert report.num_modules == 0 and before.relu == calls
    out, functions, ops = run_counted(model, x)
    assert functions.relu == 0 and ops.relu == 0 and ops.elu == calls
    assert report.functional_calls == calls
    assert torch.equal(out, elu_by_patching(reference, x))


def test_densenet121_modules_and_one_functional_call():
    model = build("densenet121")
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    report = swap_activations(model)
    assert report.num_modules == 120
    out, functions, ops = run_counted(model, X)
    assert functions.relu == 0 and ops.relu == 0 and ops.elu == 121
    assert report.functional_calls == 1 and report.functional_owners == [""]  # F.relu in DenseNet.forward
    assert list(model.state_dict()) == keys
    assert torch.equal(out, elu_by_patching(reference, X))


def test_mobilenet_v2_relu6_left_alone_unless_named():
    model = build("mobilenet_v2")
    reference = copy.deepcopy(model)
    report = swap_activations(model)
    assert report.num_modules == 0
    _, functions, ops = run_counted(model, X)
    assert functions.relu == 0 and ops.relu == 35 and ops.elu == 0  # 35 nn.ReLU6, untouched

    model = copy.deepcopy(reference)
    report = swap_activations(model, targets=["ReLU6"])
    assert report.num_modules == 35
    out, functions, ops = run_counted(model, X)
    assert ops.relu == 0 and ops.elu == 35
    assert torch.equal(out, elu_by_patching(reference, X, relu6=True))
