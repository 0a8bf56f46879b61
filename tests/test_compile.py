"""torch.compile: a masked model trains compiled as users compile it, with eager-matching losses and moving masks.

The unit test uses the ``aot_eager`` backend: it runs the same graph capture (dynamo) and autograd tracing (AOT) that
break forward-hook based pruning, without spending a minute in inductor's C++ code generation on 2 CPU cores.
``benchmarks/gpu_check.py`` runs the full inductor backend on a GPU.
"""

import pytest
import torch

from lightning_scl.callbacks.scl import SparseConnectivityLearning
from lightning_scl.masking import fold_state_dict
from tests.conftest import MLP, loader, quiet_trainer


def _train(compiled: bool):
    torch.manual_seed(0)
    model = MLP()
    scl = SparseConnectivityLearning(lam=0.3, mask_lr=0.05)
    target = torch.compile(model, backend="aot_eager") if compiled else model
    quiet_trainer(callbacks=[scl], max_steps=6).fit(target, loader())
    return model, scl, target


@pytest.mark.slow
def test_compiled_model_matches_eager_and_masks_move():
    torch._dynamo.reset()
    eager, scl_eager, _ = _train(compiled=False)
    compiled, scl_compiled, wrapper = _train(compiled=True)
    assert type(wrapper).__name__ == "OptimizedModule"
    assert len(compiled.losses) == 6
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=1e-5, atol=1e-5)
    assert scl_compiled.density < 1.0
    assert scl_compiled.density == scl_eager.density
    for name, mask in scl_compiled.masks.items():
        torch.testing.assert_close(mask.mask, scl_eager.masks[name].mask, rtol=1e-5, atol=1e-5)
    # The plain state_dict folds from the compiled run too, and reproduces its outputs in an un-instrumented model.
    plain = MLP()
    plain.load_state_dict(fold_state_dict(compiled.state_dict()), strict=True)
    x = torch.randn(4, 16)
    torch.testing.assert_close(plain(x), wrapper(x))
