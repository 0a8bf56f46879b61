"""torch.compile: a masked model trains compiled as users compile it, with eager-matching losses and moving masks.

The unit test uses the ``aot_eager`` backend: it runs the same graph capture (dynamo) and autograd tracing (AOT) that
break forward-hook based pruning, without spending a minute in inductor's C++ code generation on 2 CPU cores.
``benchmarks/gpu_check.py`` runs the full inductor backend on a GPU.
"""

import tempfile

import lightning.pytorch as L
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from lightning_scl.accounting import dense_macs_by_layer
from lightning_scl.callbacks.scl import SparseConnectivityLearning
from lightning_scl.export import export_pruned
from lightning_scl.masking import fold_state_dict
from lightning_scl.models import ImageClassifier
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


def test_exports_and_flops_of_a_compiled_model_are_the_plain_models():
    """After compiled training, export and FLOPs counting see the user's module, not torch.compile's wrapper."""
    torch._dynamo.reset()
    model, _, wrapper = _train(compiled=True)
    with tempfile.TemporaryDirectory() as tmp:
        plain = MLP()
        plain.load_state_dict(load_file(export_pruned(wrapper, f"{tmp}/m.safetensors")), strict=True)  # no _orig_mod.
        x = torch.randn(4, 16)
        torch.testing.assert_close(plain(x), wrapper(x))
    # Lightning left the module's own forward compiled, which fvcore's tracer refuses; the count runs it eagerly.
    assert "forward" in vars(model)
    macs = dense_macs_by_layer(model, torch.randn(2, 16))
    linears = [(name, layer) for name, layer in MLP().named_modules() if isinstance(layer, torch.nn.Linear)]
    assert macs == {name: layer.in_features * layer.out_features for name, layer in linears}
    assert "forward" in vars(model)  # and the compiled forward is back afterwards


def test_image_classifier_compiles_once_not_every_step():
    """torchmetrics' update counter (a Python int) would make dynamo recompile the step at every step."""
    torch._dynamo.reset()
    compiles = []

    def counting_backend(graph_module, example_inputs):
        compiles.append(len(graph_module.graph.nodes))
        return graph_module.forward

    class CompilesAt(L.Callback):
        seen: list[int] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append(len(compiles))

    model = ImageClassifier("lenet300", lr=0.05)
    data = DataLoader(TensorDataset(torch.randn(8 * 8, 1, 28, 28), torch.randint(0, 10, (8 * 8,))), batch_size=8)
    at = CompilesAt()
    # (no freeze: frozen masks stop requiring gradients, a one-off recompile this test is not about)
    scl = SparseConnectivityLearning(lam=0.1, freeze_masks_at=None)
    quiet_trainer(callbacks=[scl, at], max_steps=8).fit(torch.compile(model, backend=counting_backend), data)
    assert compiles, "the backend was never called: nothing was compiled"
    # Lightning's own self.log frames compile once per logged name within the first steps; then nothing new
    assert at.seen[3] == at.seen[-1], f"graphs compiled by the end of each step: {at.seen}"
