"""FSDP: every mask is an FSDP unit of its own, so checkpoints (the optimizer state dict) can be saved.

Lightning's FSDP strategy needs a GPU; ``benchmarks/gpu_check.py`` runs it there. These tests run torch's FSDP itself
on the CPU (one gloo process), which is where the optimizer-state failure comes from, and the callback's set-up of
Lightning's strategy.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from lightning_scl.callbacks.scl import SparseConnectivityLearning, with_mask_units
from lightning_scl.masking import ConnectivityMask, inject_masks


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _train_and_save_optimizer_state(policy) -> tuple[FSDP, dict]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    inject_masks(net)
    model = FSDP(net, use_orig_params=True, device_id=torch.device("cpu"), auto_wrap_policy=policy)
    masks = [p for name, p in model.named_parameters() if name.endswith(".mask")]
    weights = [p for name, p in model.named_parameters() if not name.endswith(".mask")]
    user_optimizer = torch.optim.SGD(weights, lr=0.1, momentum=0.9)
    mask_optimizer = torch.optim.SGD(masks, lr=0.1, momentum=0.9)  # as the callback: the masks' own optimizer
    for _ in range(2):
        model(torch.randn(4, 8)).sum().backward()
        assert all(m.grad is not None and m.grad.shape == m.shape for m in masks)
        mask_optimizer.step()
        mask_optimizer.zero_grad()
        user_optimizer.step()
        user_optimizer.zero_grad()
    return model, FSDP.optim_state_dict(model, user_optimizer)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_masks_sharing_a_unit_with_their_weights_break_the_optimizer_state_dict(process_group):
    with pytest.raises(RuntimeError, match="mask is not in the optimizer state"):
        _train_and_save_optimizer_state(policy=None)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_masks_in_their_own_units_save_and_keep_their_names(process_group):
    model, state = _train_and_save_optimizer_state(with_mask_units(ModuleWrapPolicy({nn.Linear})))
    units = [m for m in model.modules() if isinstance(m, FSDP)]
    assert sum(isinstance(u.module, ConnectivityMask) for u in units) == 2
    assert sum(isinstance(u.module, nn.Linear) for u in units) == 2  # the user's own policy still applies
    assert set(state["state"]) == {
        "0.bias",
        "0.parametrizations.weight.original",
        "2.bias",
        "2.parametrizations.weight.original",
    }
    assert "0.parametrizations.weight.0.mask" in model.state_dict()


def test_the_callback_extends_lightnings_fsdp_policy():
    strategy = FSDPStrategy(auto_wrap_policy={nn.Linear})
    SparseConnectivityLearning()._prepare_fsdp(SimpleNamespace(strategy=strategy, world_size=1), nn.Linear(2, 2))
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {nn.Linear, ConnectivityMask}
    plain = FSDPStrategy()
    SparseConnectivityLearning()._prepare_fsdp(SimpleNamespace(strategy=plain, world_size=1), nn.Linear(2, 2))
    assert plain.kwargs["auto_wrap_policy"]._module_classes == {ConnectivityMask}


def test_sharded_fsdp_across_processes_is_refused_with_the_alternatives():
    trainer = SimpleNamespace(strategy=FSDPStrategy(), world_size=2)
    with pytest.raises(ValueError, match=r"strategy='ddp'.*NO_SHARD"):
        SparseConnectivityLearning()._prepare_fsdp(trainer, nn.Linear(2, 2))
    unsharded = SimpleNamespace(strategy=FSDPStrategy(sharding_strategy=ShardingStrategy.NO_SHARD), world_size=2)
    SparseConnectivityLearning()._prepare_fsdp(unsharded, nn.Linear(2, 2))
    assert ConnectivityMask in unsharded.strategy.kwargs["auto_wrap_policy"]._module_classes


def test_policies_of_every_form_are_extended():
    from torch.distributed.fsdp.wrap import CustomPolicy, size_based_auto_wrap_policy

    custom = with_mask_units(CustomPolicy(lambda module: isinstance(module, nn.Linear)))
    assert custom._lambda_fn(ConnectivityMask((2, 2))) and custom._lambda_fn(nn.Linear(2, 2))
    assert not custom._lambda_fn(nn.ReLU())
    legacy = with_mask_units(size_based_auto_wrap_policy)
    assert legacy(module=ConnectivityMask((2, 2)), recurse=False, nonwrapped_numel=4)
    assert not legacy(module=nn.ReLU(), recurse=False, nonwrapped_numel=0)
    with pytest.raises(TypeError, match="include ConnectivityMask"):
        with_mask_units("transformer")


def test_under_fsdp_flops_are_counted_before_the_model_is_wrapped():
    """Once wrapped, FSDP's inner units refuse to run before the root: the count (which runs the model) comes first."""
    from tests.conftest import MLP

    model = MLP()
    scl = SparseConnectivityLearning()
    scl._inject(model)
    scl._prepare_fsdp(SimpleNamespace(strategy=FSDPStrategy(), world_size=1), model)
    accountant = scl._reporter.accountant
    assert accountant._counted and accountant.has_flops
    assert accountant.dense_macs_by_layer() == {"net.0": 16 * 32, "net.2": 32 * 32, "head": 32 * 4}

    bare = MLP()
    bare.example_input_array = None
    scl = SparseConnectivityLearning()
    scl._inject(bare)
    scl._prepare_fsdp(SimpleNamespace(strategy=FSDPStrategy(), world_size=1), bare)
    accountant = scl._reporter.accountant
    scl._reporter.on_train_batch_start((torch.randn(4, 16), torch.zeros(4)))  # the first batch cannot change that
    assert not accountant.has_flops
    assert "example_input_array" in accountant.flops_unavailable_reason
