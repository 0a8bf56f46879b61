"""ELU swap: swap_activations (pure torch) and the ELUSwap callback."""

from __future__ import annotations

import copy
import logging
import pickle
import warnings

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset

from lightning_scl.activations import (
    LearnableELU,
    PerCallSite,
    SwapConfig,
    apply_elu,
    restore_activations,
    swap_activations,
)
from lightning_scl.callbacks.elu import ELUSwap
from tests.conftest import MLP, loader, quiet_trainer

RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}


class CountRelu(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func in RELU_FUNCTIONS
        return func(*args, **(kwargs or {}))


def relu_calls(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), CountRelu() as counter:
        model(x)
    return counter.calls


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny forwards: one thread is faster


class Functional(nn.Module):
    """Every functional ReLU form; ``relu_`` results used only through their side effect."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        a = F.relu(self.fc(x))
        b = torch.relu(x - 1)
        c = (x + 1).relu()
        d = F.relu(x * 2, inplace=True)
        e = x * 3
        e.relu_()  # return value ignored: the rewrite must keep the in-place contract
        f = x * 4
        torch.relu_(f)
        g = F.relu_(x * 5)
        return a + b + c + d + e + f + g


def functional_reference(model: Functional, x: torch.Tensor, alpha: float) -> torch.Tensor:
    elu = lambda t: F.elu(t, alpha)  # noqa: E731
    return elu(model.fc(x)) + elu(x - 1) + elu(x + 1) + elu(x * 2) + elu(x * 3) + elu(x * 4) + elu(x * 5)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"targets": ["Relu"]}, r"targets: unknown activation.*'ReLU6'"),
        ({"targets": []}, "targets must name at least one"),
        ({"alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"alpha": -1.0}, "alpha must be a finite number > 0"),
        ({"alpha": float("nan")}, "alpha must be a finite number > 0"),
        ({"functional": "rewrite_all"}, r"functional must be one of \['rewrite', 'warn', 'ignore'\]"),
        ({"include": ["layer[1"]}, "include: invalid regular expression 'layer\\[1'"),
        ({"exclude": ["(fc"]}, "exclude: invalid regular expression"),
        ({"replacement": "SELU"}, r"replacement must be one of \['ELU', 'CELU', 'LearnableELU'\]"),
        ({"targets": ["ReLU", "ELU"]}, "targets must not contain the replacement 'ELU'"),
        ({"inplace": "yes"}, "inplace must be True or False"),
    ],
)
def test_invalid_arguments_are_rejected_with_the_accepted_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ELUSwap(**kwargs)
    with pytest.raises(ValueError, match=match):
        swap_activations(nn.Sequential(nn.ReLU()), **kwargs)


def test_config_round_trips_through_plain_dicts():
    config = SwapConfig(alpha=0.5, targets="ReLU6", include=["a.*"], functional="warn")
    data = config.to_dict()
    assert data["targets"] == ["ReLU6"] and data["include"] == ["a.*"]
    assert SwapConfig.from_dict({**data, "version": 1, "modules": 3}) == config


# ---------------------------------------------------------------- module swap


class Mixed(nn.Module):
    class MyReLU(nn.ReLU):
        pass

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.relu, self.relu6, self.leaky = nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.1)
        self.custom = Mixed.MyReLU()
        self.prelu = nn.PReLU()

    def forward(self, x):
        x = self.fc(x)
        return self.relu(x) + self.relu6(x) + self.leaky(x) + self.custom.forward(x) * 0 + self.prelu(x)


def test_module_types_match_exactly_and_keys_stay():
    model = Mixed()
    keys = list(model.state_dict())
    report = swap_activations(model)
    assert report.modules == ["relu"]
    assert type(model.relu) is nn.ELU and model.relu.alpha == 1.0
    assert type(model.relu6) is nn.ReLU6 and type(model.leaky) is nn.LeakyReLU
    assert type(model.custom) is Mixed.MyReLU  # a subclass is not the exact type
    assert list(model.state_dict()) == keys

    model = Mixed()
    swap_activations(model, targets=["ReLU6", "LeakyReLU"], alpha=0.3)
    assert type(model.relu) is nn.ReLU
    assert type(model.relu6) is nn.ELU and type(model.leaky) is nn.ELU and model.leaky.alpha == 0.3


def test_swapping_a_parametric_target_drops_its_parameters():
    model = Mixed()
    report = swap_activations(model, targets=["PReLU"])
    assert report.modules == ["prelu"]
    assert "prelu.weight" not in model.state_dict()


class Reused(nn.Module):
    """One ReLU instance used at three call sites, as torchvision's BasicBlock does with two."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.relu(x - 0.5)


def test_reused_module_gets_one_replacement_per_call_site():
    torch.manual_seed(0)
    model = Reused()
    keys = list(model.state_dict())
    x = torch.randn(3, 4)
    expected = F.elu(F.elu(model.fc2(F.elu(model.fc1(x)))) - 0.5)
    report = swap_activations(model)
    assert report.call_sites == {"relu": 3}
    assert isinstance(model.relu, PerCallSite) and len({id(s) for s in model.relu.sites}) == 3
    assert list(model.state_dict()) == keys  # parameter-free sites add no keys
    calls = []
    for i, site in enumerate(model.relu.sites):
        site.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    torch.testing.assert_close(model(x), expected)
    assert calls == [0, 1, 2]


def test_call_index_restarts_after_an_interrupted_forward():
    model = Reused()
    swap_activations(model)
    model.fc2.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(2, 4))
    assert model.relu.next_site == 1  # the forward stopped after the first call
    model.fc2._forward_pre_hooks.clear()
    calls = []
    for i, site in enumerate(model.relu.sites):
        site.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
    model(torch.randn(2, 4))
    assert calls == [0, 1, 2]


def test_untraceable_parent_keeps_one_shared_replacement():
    class DataDependent(Reused):
        def forward(self, x):
            x = self.relu(self.fc1(x))
            if x.sum() > 0:  # torch.fx cannot trace this
                x = self.relu(self.fc2(x))
            return x

    model = DataDependent()
    report = swap_activations(model)
    assert report.untraced == ["relu"] and type(model.relu) is nn.ELU
    assert "untraceable" in report.summary()


def test_include_exclude_select_subtrees_for_modules_and_functional_calls():
    def block():
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Functional())

    model = nn.Sequential(block(), block(), block())
    report = swap_activations(model, exclude=["1"], include=["0", "1", "2.2"])
    assert report.modules == ["0.1"]
    assert sorted(report.skipped) == ["1.1", "2.1"]
    assert type(model[1][1]) is nn.ReLU and type(model[2][1]) is nn.ReLU
    x = torch.randn(2, 4)
    # left as ReLU: block 1's 7 functional calls (excluded) and the two unselected nn.ReLU modules
    assert relu_calls(model, x) == 7 + 2
    assert report.functional_owners == ["0.2", "2.2"]


# ---------------------------------------------------------------- functional calls


def test_functional_forms_are_rerouted_including_in_place_contract():
    torch.manual_seed(0)
    model = Functional()
    x = torch.randn(5, 4)
    expected = functional_reference(model, x, alpha=0.7)
    report = swap_activations(model, alpha=0.7)
    assert report.num_modules == 0
    assert relu_calls(model, x) == 0
    assert report.functional_calls == 7 and report.functional_owners == [""]
    torch.testing.assert_close(model(x), expected)
    with torch.no_grad():  # eval / inference use the same path
        torch.testing.assert_close(model.eval()(x), expected)


def test_aten_operator_calls_of_an_exported_graph_are_rerouted():
    torch.manual_seed(0)
    x = torch.randn(16, 4)
    dense = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.LeakyReLU(0.2), nn.Linear(4, 2))
    exported = torch.export.export(dense, (x,)).module()  # its forward calls torch.ops.aten.relu.default
    report = swap_activations(exported, targets=["ReLU", "LeakyReLU"])
    assert report.num_modules == 0
    with torch.no_grad():
        expected = dense[4](F.elu(dense[2](F.elu(dense[0](x)))))
        torch.testing.assert_close(exported(x), expected)
    assert report.functional_calls == 2

    class Packets(nn.Module):
        def forward(self, x):
            y = x.clone()
            torch.ops.aten.relu_(y)  # in-place contract: the caller ignores the return value
            return torch.ops.aten.relu(x) + y

    model = Packets()
    swap_activations(model)
    torch.testing.assert_close(model(x), 2 * F.elu(x))


def test_functional_warn_and_ignore_leave_relu():
    x = torch.randn(2, 4)
    model = Functional()
    report = swap_activations(model, functional="warn")
    with pytest.warns(UserWarning, match="functional relu in module '<root>' left unchanged"):
        out = model(x)
    assert relu_calls(model, x) == 7 and report.functional_calls == 14
    assert (out >= 0).all()

    model = Functional()
    report = swap_activations(model, functional="ignore")
    assert report.functional_calls is None and not model._forward_pre_hooks
    assert relu_calls(model, x) == 7


def test_functional_calls_in_a_submodule_called_directly_are_rerouted():
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = Functional()

    model = Wrapper()
    swap_activations(model)
    # like a training_step calling self.backbone(x), never the root's forward
    assert relu_calls(model.backbone, torch.randn(2, 4)) == 0


class SigmoidThenRelu(nn.Module):
    """conv -> sigmoid -> relu_: sigmoid's backward needs its output, which an in-place op overwrites."""

    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 1)
        self.functional = functional

    def forward(self, x):
        x = torch.sigmoid(self.conv(x))
        x = x.relu_() if self.functional else self.act(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("functional", [True, False])
@pytest.mark.parametrize("inplace", [False, True])
def test_in_place_relu_after_sigmoid_trains_after_the_swap(functional, inplace):
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 6, 6), torch.randn(8, 1)
    model = SigmoidThenRelu(functional)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        F.mse_loss(model(x), y).backward()  # the original cannot train
    model.zero_grad()
    swap_activations(model, inplace=inplace)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert model.conv.weight.grad.abs().sum() > 0
    assert losses[-1] < losses[0]


class SideEffectRelu(nn.Module):
    """Calls an in-place ReLU for its side effect and ignores the return value."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.fc(x)
        self.act(h)
        return h


@pytest.mark.parametrize("replacement", ["ELU", "CELU", "LearnableELU"])
def test_in_place_module_used_for_its_side_effect_keeps_its_activation(replacement):
    torch.manual_seed(0)
    model, x = SideEffectRelu(), torch.randn(64, 4)
    assert (model(x) >= 0).all()
    swap_activations(model, replacement=replacement)
    with torch.no_grad():
        expected = F.elu(model.fc(x))
    out = model(x)
    assert (out < 0).any() and out.min() >= -1.0
    torch.testing.assert_close(out, expected)
    out.sum().backward()  # in place after a linear layer leaves backward intact
    assert model.fc.weight.grad.abs().sum() > 0
    if replacement == "LearnableELU":
        assert model.act.alpha.grad is not None and model.act.alpha.grad.abs().sum() > 0
        # the gradient through the in-place path equals the out-of-place one
        h = model.fc(x).detach().requires_grad_()
        LearnableELU(1.0)(h).pow(2).sum().backward()
        g = model.fc(x).detach().requires_grad_()
        LearnableELU(1.0, inplace=True)(g * 1.0).pow(2).sum().backward()
        torch.testing.assert_close(g.grad, h.grad)
    restore_activations(model)
    swap_activations(model, inplace=False)  # the opt-out: out of place, so the side effect is gone
    torch.testing.assert_close(model(x), model.fc(x))


def test_inplace_option_runs_in_place_where_safe():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 4), nn.ReLU())
    swap_activations(model)
    assert model[1].inplace and not model[3].inplace  # only in-place originals become in place
    x = torch.randn(3, 4, requires_grad=True)
    h = model[0](x)
    assert model[1](h) is h  # after a linear layer, in place is safe
    s = torch.sigmoid(h)
    out = model[1](s)
    assert out is not s  # after sigmoid it falls back to out of place
    out.sum().backward()


# ---------------------------------------------------------------- repeat, restore, copies, compile


def test_repeated_swap_is_a_no_op_and_restore_undoes_it():
    model = nn.Sequential(Reused(), Functional())
    x = torch.randn(2, 4)
    reference = model(x)
    report = swap_activations(model)
    modules = [id(m) for m in model.modules()]
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    assert swap_activations(model) is report
    assert [id(m) for m in model.modules()] == modules
    assert hooks == sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    assert not isinstance(model[0].relu.sites[0], PerCallSite)
    with pytest.raises(ValueError, match="already swapped"):
        swap_activations(model, alpha=0.5)

    assert restore_activations(model)
    assert type(model[0].relu) is nn.ReLU
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    torch.testing.assert_close(model(x), reference)
    assert not restore_activations(model)


def test_new_modules_are_swapped_by_a_repeat_call():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    swap_activations(model)
    model.append(nn.ReLU())
    report = swap_activations(model)
    assert report.modules == ["1", "2"] and type(model[2]) is nn.ELU


def test_swapped_model_survives_deepcopy_and_pickle():
    torch.manual_seed(0)
    model = nn.Sequential(Reused(), Functional())
    report = swap_activations(model)
    x = torch.randn(2, 4)
    expected = model(x)
    calls = report.functional_calls
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(clone(x), expected)
        assert relu_calls(clone, x) == 0
        assert restore_activations(clone) and type(clone[0].relu) is nn.ReLU
    assert report.functional_calls == calls  # each copy has its own router
    assert relu_calls(model, x) == 0 and type(model[0].relu) is PerCallSite  # the original is unaffected


class CompileFriendly(nn.Module):
    """The functional forms dynamo dispatches to the reroute mode (all but torch.relu_ / F.relu_)."""

    def forward(self, x):
        a = F.relu(x)
        b = torch.relu(x - 1)
        c = (x + 1).relu()
        d = F.relu(x * 2, inplace=True)
        e = x * 3
        e.relu_()
        return a + b + c + d + e


def test_torch_compile_keeps_the_swap_without_graph_breaks():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(Reused(), CompileFriendly())
    swap_activations(model)
    x = torch.randn(2, 4)
    expected = model(x)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(model, backend="aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no compile caveat for this model
        for _ in range(3):
            torch.testing.assert_close(compiled(x), expected)
    unswapped = copy.deepcopy(model)
    restore_activations(unswapped)
    assert not torch.allclose(unswapped(x), expected)  # the comparison can tell ReLU from ELU


def test_torch_relu_underscore_is_flagged_for_torch_compile():
    torch._dynamo.reset()
    model = nn.Sequential(Reused(), Functional())  # Functional calls torch.relu_ and F.relu_
    report = swap_activations(model)
    assert report.compile_blind == ["1"] and "not rerouted under torch.compile" in report.summary()
    x = torch.randn(2, 4)
    model(x)  # eager: no warning, and correct (see test_functional_forms_are_rerouted...)
    with pytest.warns(UserWarning, match=r"torch.compile: the forward of \['1'\] calls torch.relu_"):
        torch.compile(model, backend="aot_eager")(x)


# ---------------------------------------------------------------- Lightning


class ReusedMLP(MLP):
    """conftest's MLP with a reused ReLU and a functional one."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
        self.block = Reused(32)

    def forward(self, x):
        return self.head(F.relu(self.block(self.net(x))))


def fit(model, callbacks, **kwargs):
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, callbacks=callbacks, **kwargs)
    trainer.fit(model, loader(), loader())
    return trainer


def test_callback_swaps_before_optimizers_and_learnable_parameters_are_trained():
    torch.manual_seed(0)
    model = ReusedMLP()
    trainer = fit(model, [ELUSwap(replacement="LearnableELU", alpha=0.8, verbose=False)])
    sites = list(model.block.relu.sites)
    assert len(sites) == 3 and all(isinstance(site, LearnableELU) for site in sites)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    new = [site.alpha for site in sites] + [model.net[1].alpha]
    assert all(id(p) in optimized for p in new)
    assert any(p.item() != pytest.approx(0.8) for p in new)  # they were trained


def test_fit_then_test_does_not_swap_twice(caplog):
    model = ReusedMLP()
    callback = ELUSwap()
    with caplog.at_level(logging.INFO):
        trainer = fit(model, [callback])
        modules = {name: id(m) for name, m in model.named_modules()}
        hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
        trainer.test(model, loader(), verbose=False)
    assert {name: id(m) for name, m in model.named_modules()} == modules
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks
    assert not any(isinstance(s, PerCallSite) for s in model.block.relu.sites)
    assert "configure_model" not in vars(model)
    messages = [r.getMessage() for r in caplog.records if "ELUSwap" in r.getMessage()]
    assert len([m for m in messages if "swapped 2 module(s) (4 call site(s))" in m]) == 1, messages
    assert len([m for m in messages if "functional call(s) rerouted in the first batch" in m]) == 1, messages
    assert callback.report.functional_calls > 0 and relu_calls(model, torch.zeros(2, 16)) == 0


def test_nothing_to_swap_warns_loudly():
    class SiLUModel(MLP):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU())

    with pytest.warns(UserWarning, match="ELUSwap SWAPPED NOTHING"):
        fit(SiLUModel(), [ELUSwap(verbose=False)])
    with pytest.warns(UserWarning, match="ELUSwap SWAPPED NOTHING"):
        fit(SiLUModel(), [ELUSwap(functional="ignore", verbose=False)])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*SWAPPED NOTHING.*")
        fit(MLP(), [ELUSwap(verbose=False)])


class BuiltInConfigureModel(MLP):
    def __init__(self) -> None:
        super().__init__()
        del self.net

    def configure_model(self) -> None:
        if not hasattr(self, "net"):
            self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())


def test_modules_built_in_configure_model_are_swapped_before_the_optimizer():
    torch.manual_seed(0)
    model = BuiltInConfigureModel()
    trainer = fit(model, [ELUSwap(replacement="LearnableELU", verbose=False)])
    assert isinstance(model.net[1], LearnableELU)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(model.net[1].alpha) in optimized
    assert "configure_model" not in vars(model)  # the wrapper is gone after teardown


def test_checkpoint_records_the_swap_and_reload_predicts_the_same(tmp_path):
    torch.manual_seed(0)
    model = ReusedMLP()
    trainer = fit(model, [ELUSwap(alpha=0.6, verbose=False)])
    x = torch.randn(8, 16)
    model.eval()
    with torch.no_grad():
        before = model(x)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["lightning_scl"]["elu_swap"]["alpha"] == 0.6
    assert checkpoint["lightning_scl"]["elu_swap"]["targets"] == ["ReLU"]
    assert checkpoint["callbacks"]["ELUSwap"]["config"]["alpha"] == 0.6
    assert set(checkpoint["state_dict"]) == set(ReusedMLP().state_dict())  # keys unchanged by the swap

    # helper: plain load, then swap as recorded
    reloaded = ReusedMLP.load_from_checkpoint(path).eval()
    with torch.no_grad():
        assert not torch.allclose(reloaded(x), before)  # a plain reload is still ReLU
    apply_elu(reloaded, path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), before)

    # callback: the recorded settings, applied by predict's setup
    reloaded = ReusedMLP.load_from_checkpoint(path)
    callback = ELUSwap.from_checkpoint(path, verbose=False)
    assert callback.config.alpha == 0.6
    predictions = quiet_trainer(callbacks=[callback]).predict(reloaded, DataLoader(TensorDataset(x), batch_size=8))
    torch.testing.assert_close(predictions[0], before)


def test_checkpoint_record_keeps_other_lightning_scl_entries(tmp_path):
    class WritesSCL(L.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            checkpoint.setdefault("lightning_scl", {})["scl"] = {"density": 0.5}

    for callbacks in ([WritesSCL(), ELUSwap(verbose=False)], [ELUSwap(verbose=False), WritesSCL()]):
        trainer = fit(MLP(), callbacks)
        trainer.save_checkpoint(tmp_path / "c.ckpt")
        section = torch.load(tmp_path / "c.ckpt", weights_only=True)["lightning_scl"]
        assert section["scl"] == {"density": 0.5} and section["elu_swap"]["replacement"] == "ELU"


def test_resume_restores_learnable_replacements(tmp_path):
    torch.manual_seed(0)
    model = ReusedMLP()
    trainer = fit(model, [ELUSwap(replacement="LearnableELU", verbose=False)])
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    trained = {name: p.item() for name, p in model.named_parameters() if name.endswith("alpha")}
    assert len(trained) == 4 and any(v != 1.0 for v in trained.values())

    resumed = ReusedMLP()
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=0, limit_val_batches=0)
    trainer.callbacks.append(ELUSwap(replacement="LearnableELU", verbose=False))
    trainer.fit(resumed, loader(), loader(), ckpt_path=tmp_path / "c.ckpt")  # strict load: same keys after swap
    assert {name: p.item() for name, p in resumed.named_parameters() if name.endswith("alpha")} == trained


def test_callback_warn_mode_reports_functional_calls_left_alone():
    with pytest.warns(UserWarning, match=r"functional \['ReLU'\] call\(s\) in the first batch .* left unchanged"):
        fit(ReusedMLP(), [ELUSwap(functional="warn", verbose=False)])


def test_spawn_strategies_warn_unless_the_model_was_swapped_before_launch():
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    with pytest.warns(UserWarning, match="comes back from fit unswapped"):
        ELUSwap(verbose=False).setup(trainer, MLP(), "fit")
    model = MLP()
    apply_elu(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*unswapped.*")
        ELUSwap(verbose=False).setup(trainer, model, "fit")


def test_resume_with_other_settings_warns():
    callback = ELUSwap(verbose=False)
    with pytest.warns(UserWarning, match="checkpoint was trained with"):
        callback.load_state_dict({"config": SwapConfig(alpha=0.5).to_dict()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # in place or not is the same function: a checkpoint from before is quiet
        callback.load_state_dict({"config": SwapConfig(inplace=False).to_dict()})


@pytest.mark.parametrize("elu_first", [True, False])
def test_works_with_sparse_connectivity_learning_in_either_order(elu_first, tmp_path):
    from lightning_scl.callbacks.scl import SparseConnectivityLearning

    torch.manual_seed(0)
    model = BuiltInConfigureModel()  # both callbacks must also handle configure_model
    scl = SparseConnectivityLearning(lam=0.1)
    elu = ELUSwap(replacement="LearnableELU", verbose=False)
    trainer = fit(model, [elu, scl] if elu_first else [scl, elu])
    assert scl.masks and all(isinstance(model.net[i], LearnableELU) for i in (1, 3))
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert id(model.net[1].alpha) in optimized
    assert relu_calls(model, torch.zeros(2, 16)) == 0
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    section = torch.load(tmp_path / "c.ckpt", weights_only=True)["lightning_scl"]
    assert {"scl", "elu_swap"} <= set(section)
    trainer.test(model, loader(), verbose=False)
    # Teardowns run in callback order, so when SCL wrapped on top of ELUSwap's configure_model wrapper, SCL puts
    # it back: it is then an inactive pass-through, and the next run does not stack another one on it.
    left = vars(model).get("configure_model")
    assert left is None or (not left.active and left.previous.__func__ is BuiltInConfigureModel.configure_model)


class _TwiceActivated(nn.Module):
    """One ReLU called at two sites; ``checkpointing`` recomputes the second site, or the whole block, in backward."""

    def __init__(self, checkpointing: str | None = None) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act, self.checkpointing = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU(), checkpointing

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = self.act(self.fc1(x))
        second = lambda t: self.act(self.fc2(t))  # noqa: E731
        return checkpoint(second, h, use_reentrant=False) if self.checkpointing == "part" else second(h)


def _alpha_gradients(checkpointing: str | None) -> list[torch.Tensor]:
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    block = _TwiceActivated(checkpointing)
    swap_activations(block, replacement="LearnableELU", quiet=True)
    with torch.no_grad():
        block.act.sites[0].alpha.fill_(0.5)
        block.act.sites[1].alpha.fill_(2.0)
    x = torch.randn(16, 4) * 3
    out = checkpoint(block, x, use_reentrant=False) if checkpointing == "whole" else block(x)
    out.sum().backward()
    return [site.alpha.grad.clone() for site in block.act.sites]


def test_learnable_elu_call_sites_under_activation_checkpointing():
    # Recomputing the whole block runs its forward pre-hook, so each call reaches its own site again; recomputing
    # only the second call cannot tell which site it is: an error, not gradients sent to the first site's alpha.
    plain = _alpha_gradients(None)
    for got, want in zip(_alpha_gradients("whole"), plain):
        torch.testing.assert_close(got, want)
    with pytest.raises(RuntimeError, match="ran during backward without its parent module being called"):
        _alpha_gradients("part")


def test_a_relu_subclass_is_left_alone_with_its_functional_call():
    class MyReLU(nn.ReLU):
        pass

    model = nn.Sequential(nn.Linear(4, 4), MyReLU())
    report = swap_activations(model)
    x = torch.randn(64, 4)
    h = model[0](x)
    assert report.num_modules == 0 and type(model[1]) is MyReLU
    torch.testing.assert_close(model(x), F.relu(h))  # its inherited forward's F.relu is not rerouted to ELU
