"""Benchmark networks, the factory and ImageClassifier (trained on synthetic data only)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_scl.data import CIFAR10DataModule
from lightning_scl.models import (
    MODEL_INPUT_SHAPES,
    CifarResNet,
    ELUPaperCifarCNN,
    ELUPaperMLP,
    ImageClassifier,
    LeNet5Caffe,
    LeNet300100,
    ShiftedReLU,
    VGG16Cifar,
    build_model,
    make_activation,
    resnet20,
    resnet56,
)


def weight_count(model: nn.Module) -> int:
    """Connections: entries of conv/linear weight tensors (biases and BN parameters excluded)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))


def bias_count(model: nn.Module) -> int:
    return sum(m.bias.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None)


def _trainer(**kwargs: object) -> L.Trainer:
    return L.Trainer(
        fast_dev_run=True,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("name", "num_classes"),
    [
        ("lenet300", 10),
        ("lenet5", 10),
        ("elu_mlp", 10),
        ("resnet20", 10),
        ("resnet56", 100),
        ("vgg16", 10),
        ("elu_cifar_cnn", 100),
        ("resnet50", 7),
    ],
)
def test_factory_forward_shapes(name: str, num_classes: int) -> None:
    model = build_model(name, num_classes=num_classes).eval()
    shape = MODEL_INPUT_SHAPES[name]
    if name == "resnet50":
        shape = (3, 64, 64)  # any size works after its adaptive pool; keeps the test fast
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, num_classes)


def test_unknown_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="lenet300"):
        build_model("lenet-300")
    with pytest.raises(ValueError, match="srelu"):
        make_activation("gelu")


def test_lenet_weight_counts() -> None:
    assert weight_count(LeNet300100()) == 266_200 and bias_count(LeNet300100()) == 410
    assert weight_count(LeNet5Caffe()) == 430_500
    assert weight_count(LeNet5Caffe(conv_activations=False)) == 430_500
    assert sum(isinstance(m, nn.ReLU) for m in LeNet5Caffe(conv_activations=False).modules()) == 1


def test_cifar_resnets() -> None:
    r20, r56 = resnet20(), resnet56()
    # option B: exactly two 1x1 projection shortcuts (stage 1->2 and 2->3), all other shortcuts identity
    projections = [m for m in r20.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(projections) == 2
    assert sum(isinstance(m, nn.Conv2d) for m in r20.modules()) == 19 + 2  # 19 3x3 convs + 2 projections
    assert sum(isinstance(m, nn.Conv2d) for m in r56.modules()) == 55 + 2
    assert 0.26e6 < sum(p.numel() for p in r20.parameters()) < 0.28e6
    assert 0.85e6 < sum(p.numel() for p in r56.parameters()) < 0.87e6
    with pytest.raises(ValueError, match="6n"):
        CifarResNet(depth=21)


def test_vgg16_cifar() -> None:
    model = VGG16Cifar()
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 13
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert not any(isinstance(m, nn.BatchNorm2d) for m in VGG16Cifar(batch_norm=False).modules())


def test_elu_paper_mlp() -> None:
    model = ELUPaperMLP(activation="elu")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [lin.out_features for lin in linears] == [128] * 8 + [10]
    assert sum(isinstance(m, nn.ELU) for m in model.modules()) == 8
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


def test_elu_paper_cifar_cnn_architecture() -> None:
    model = ELUPaperCifarCNN(num_classes=100)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0]) for c in convs] == [
        (192, 5), (192, 1), (240, 3), (240, 1), (260, 2), (260, 1), (280, 2), (280, 1), (300, 2), (300, 1), (100, 1),
    ]  # fmt: skip
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert sum(isinstance(m, nn.ELU) for m in model.modules()) == 10  # the classifier conv has none
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert not any(isinstance(m, nn.Dropout) for m in ELUPaperCifarCNN(dropout=False).modules())


@pytest.mark.parametrize(
    ("activation", "cls"),
    [("relu", nn.ReLU), ("elu", nn.ELU), ("leaky_relu", nn.LeakyReLU), ("srelu", ShiftedReLU)],
)
def test_activation_argument_and_one_module_per_use(activation: str, cls: type) -> None:
    for model in (
        LeNet300100(activation=activation),
        resnet20(activation=activation),
        VGG16Cifar(activation=activation),
    ):
        acts = [m for m in model.modules() if isinstance(m, cls)]
        assert acts, type(model).__name__
        # modules() deduplicates: a reused activation would make this count smaller than the uses
        uses = sum(1 for _, m in model.named_modules(remove_duplicate=False) if isinstance(m, cls))
        assert uses == len(acts)
        assert not any(getattr(m, "inplace", False) for m in acts)
    assert make_activation("leaky_relu").negative_slope == 0.1
    assert torch.equal(ShiftedReLU()(torch.tensor([-2.0, 0.5])), torch.tensor([-1.0, 0.5]))


# ------------------------------------------------------------------------------------------ ImageClassifier


def test_classifier_trains_on_synthetic_cifar() -> None:
    dm = CIFAR10DataModule(synthetic=True, synthetic_size=20, batch_size=4)
    model = ImageClassifier("resnet20", num_classes=10, model_kwargs={"activation": "elu"})
    assert model.example_input_array.shape == (1, 3, 32, 32)
    trainer = _trainer()
    trainer.fit(model, datamodule=dm)
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(trainer.callback_metrics)
    assert not any(k.endswith(("_step", "_epoch")) for k in trainer.callback_metrics)  # one plain name each
    trainer.test(model, datamodule=dm, verbose=False)
    assert {"test/loss", "test/acc"} <= set(trainer.callback_metrics)
    logits = trainer.predict(model, datamodule=dm)
    assert logits[0].shape == (4, 10)


def test_classifier_on_tensors_with_module_and_adam() -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))
    loader = DataLoader(data, batch_size=8)
    model = ImageClassifier(LeNet5Caffe(), optimizer="adam", lr=1e-3, scheduler="none")
    assert "model" not in model.hparams and model.example_input_array is None
    before = [p.detach().clone() for p in model.parameters()]
    _trainer().fit(model, loader, loader)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="model_kwargs"):
        ImageClassifier(LeNet5Caffe(), model_kwargs={"activation": "elu"})


def test_accuracy_is_micro_averaged() -> None:
    # a model that always predicts class 0 on labels that are 0 in 7 of 10 cases: accuracy 0.7
    # (macro averaging over the two present classes would report 0.5)
    always_zero = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    nn.init.zeros_(always_zero[1].weight)
    always_zero[1].bias.data = torch.tensor([1.0, 0.0, 0.0])
    labels = torch.tensor([0] * 7 + [1] * 3)
    loader = DataLoader(TensorDataset(torch.randn(10, 1, 2, 2), labels), batch_size=10)
    model = ImageClassifier(always_zero, num_classes=3)
    (result,) = _trainer().validate(model, loader, verbose=False)
    assert result["val/acc"] == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        ("cosine", torch.optim.lr_scheduler.CosineAnnealingLR),
        ("step", torch.optim.lr_scheduler.MultiStepLR),
        ("none", None),
    ],
)
def test_optimizer_and_scheduler_configuration(scheduler: str, expected: type | None) -> None:
    model = ImageClassifier("lenet300", scheduler=scheduler, weight_decay=1e-4)
    model.trainer = L.Trainer(max_epochs=8, accelerator="cpu", logger=False, enable_checkpointing=False)
    config = model.configure_optimizers()
    opt = config["optimizer"] if isinstance(config, dict) else config
    assert isinstance(opt, torch.optim.SGD)
    (group,) = opt.param_groups
    assert group["weight_decay"] == 1e-4 and group["nesterov"] and group["momentum"] == 0.9
    assert sum(p.numel() for p in group["params"]) == sum(p.numel() for p in model.parameters())
    if expected is None:
        assert not isinstance(config, dict)
        return
    sched = config["lr_scheduler"]["scheduler"]
    assert isinstance(sched, expected) and config["lr_scheduler"]["interval"] == "epoch"
    if scheduler == "cosine":
        assert sched.T_max == 8
    else:
        assert sorted(sched.milestones) == [4, 6]


def test_invalid_classifier_options() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        ImageClassifier(optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scheduler"):
        ImageClassifier(scheduler="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="label_smoothing"):
        ImageClassifier(label_smoothing=1.0)


def test_label_smoothing_applies_to_the_training_loss_only() -> None:
    # A confident, correct prediction: plain cross-entropy is near 0, smoothed cross-entropy is not.
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    nn.init.zeros_(net[1].weight)
    net[1].bias.data = torch.tensor([20.0, 0.0, 0.0])
    batch = (torch.randn(6, 1, 2, 2), torch.zeros(6, dtype=torch.long))
    plain = ImageClassifier(net, num_classes=3)
    smoothed = ImageClassifier(net, num_classes=3, label_smoothing=0.3)
    for model in (plain, smoothed):
        model.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    expected = F.cross_entropy(net(batch[0]), batch[1], label_smoothing=0.3)
    assert float(plain.training_step(batch, 0)) < 1e-6
    assert float(smoothed.training_step(batch, 0)) == pytest.approx(float(expected)) and float(expected) > 1
    del smoothed.log  # back to Lightning's logging for the validation run
    loader = DataLoader(TensorDataset(*batch), batch_size=6)
    (result,) = _trainer().validate(smoothed, loader, verbose=False)
    assert result["val/loss"] < 1e-6
