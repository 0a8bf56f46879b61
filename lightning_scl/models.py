"""Benchmark networks as plain ``nn.Module``s, a name-based factory, and a generic ``ImageClassifier``.

Activations are always ``nn.Module`` instances, one per use (never ``F.relu`` and never one module reused), so
that an activation swap such as ELUSwap sees and replaces every one of them. None of them runs in place: an
in-place ELU after an op whose backward needs its output would break autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

__all__ = [
    "ACTIVATIONS",
    "MODEL_INPUT_SHAPES",
    "CifarResNet",
    "ELUPaperCifarCNN",
    "ELUPaperMLP",
    "ImageClassifier",
    "LeNet5Caffe",
    "LeNet300100",
    "ShiftedReLU",
    "VGG16Cifar",
    "build_model",
    "make_activation",
    "resnet20",
    "resnet56",
]

ActivationName = Literal["relu", "elu", "leaky_relu", "srelu"]


class ShiftedReLU(nn.Module):
    """SReLU of the ELU paper: ``max(-1, x)``, a ReLU shifted so that its minimum is -1 like ELU's.

    Example:
        >>> ShiftedReLU()(torch.tensor([-3.0, -0.5, 2.0]))
        tensor([-1.0000, -0.5000,  2.0000])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp_min(x, -1.0)


#: Activation constructors by name; the ELU paper compares ELU (alpha 1) with ReLU, LReLU (slope 0.1), SReLU.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "elu": lambda: nn.ELU(alpha=1.0),
    "leaky_relu": lambda: nn.LeakyReLU(negative_slope=0.1),
    "srelu": ShiftedReLU,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module: ``"relu"``, ``"elu"``, ``"leaky_relu"`` (slope 0.1) or ``"srelu"``.

    Example:
        >>> make_activation("elu")
        ELU(alpha=1.0)
    """
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def _he_init(module: nn.Module) -> None:
    # He (Kaiming) normal init for every conv/linear layer, zero biases; BN keeps its defaults (1, 0)
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class LeNet300100(nn.Module):
    """LeNet-300-100: fully connected 784-300-100-10; 266,200 weights and 410 biases.

    Example:
        >>> LeNet300100()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_features: int = 784, activation: ActivationName = "relu") -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, 300),
            make_activation(activation),
            nn.Linear(300, 100),
            make_activation(activation),
            nn.Linear(100, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet5Caffe(nn.Module):
    """LeNet-5-Caffe: conv 20@5x5, max-pool 2, conv 50@5x5, max-pool 2, fc 800-500, fc 500-10; 430,500 weights.

    Caffe's original prototxt has a single ReLU (after fc 800-500); like most PyTorch versions used in pruning
    papers we also put one after each conv (``conv_activations=True``). Pass False for the exact Caffe net.

    Example:
        >>> LeNet5Caffe()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        activation: ActivationName = "relu",
        conv_activations: bool = True,
    ) -> None:
        super().__init__()

        def conv_act() -> nn.Module:
            return make_activation(activation) if conv_activations else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5),
            conv_act(),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5),
            conv_act(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(50 * 4 * 4, 500), make_activation(activation), nn.Linear(500, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut; the shortcut is a 1x1 conv + BN where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = make_activation(activation)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of He et al. 2016: depth ``6n + 2``, three stages of ``n`` basic blocks (16/32/64 channels).

    Shortcuts use option B (1x1 conv + BN projection where the shape changes, identity elsewhere) rather than
    option A's zero-padded identity: every tensor is produced by a module, a clean residual graph that
    Torch-Pruning's dependency analysis can shrink. This adds 2 projections (~0.006M parameters for ResNet-20).

    Example:
        >>> CifarResNet(depth=20)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, activation: ActivationName = "relu") -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = make_activation(activation)
        stages: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1, activation))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet20(num_classes: int = 10, activation: ActivationName = "relu") -> CifarResNet:
    """CIFAR ResNet-20 (3 blocks per stage, about 0.27M parameters).

    Example:
        >>> resnet20(num_classes=100)(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 100])
    """
    return CifarResNet(20, num_classes, activation)


def resnet56(num_classes: int = 10, activation: ActivationName = "relu") -> CifarResNet:
    """CIFAR ResNet-56 (9 blocks per stage, about 0.86M parameters).

    Example:
        >>> len(resnet56().layer1)
        9
    """
    return CifarResNet(56, num_classes, activation)


_VGG16_CONVS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16Cifar(nn.Module):
    """VGG-16 for 32x32 inputs: the 13 3x3 conv layers (BN + activation), five max-pools, a 512-512-C classifier.

    After five pools a 32x32 input is 1x1x512, so the ImageNet classifier (4096-wide on 7x7) shrinks to
    512 -> 512 -> ``num_classes``, as in the CIFAR variants used by filter-pruning papers.

    Example:
        >>> VGG16Cifar()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, batch_norm: bool = True, activation: ActivationName = "relu") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for v in _VGG16_CONVS:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            assert isinstance(v, int)
            layers.append(nn.Conv2d(in_channels, v, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(make_activation(activation))
            in_channels = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(512, 512), make_activation(activation), nn.Linear(512, num_classes)
        )
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ELUPaperMLP(nn.Module):
    """The ELU paper's MNIST network: ``depth`` fully connected hidden layers of ``width`` units (8 x 128).

    He-initialized, no batch norm, the activation chosen by name so ReLU/ELU/LReLU/SReLU runs share one class.

    Example:
        >>> m = ELUPaperMLP(activation="elu")
        >>> m(torch.zeros(3, 1, 28, 28)).shape, sum(isinstance(x, torch.nn.ELU) for x in m.modules())
        (torch.Size([3, 10]), 8)
    """

    def __init__(
        self,
        depth: int = 8,
        width: int = 128,
        activation: ActivationName = "relu",
        in_features: int = 784,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else width, width), make_activation(activation)]
        layers.append(nn.Linear(width if depth else in_features, num_classes))
        self.net = nn.Sequential(*layers)
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# (layers as (channels, kernel)), dropout after the stack, max-pool after the stack
_ELU_CIFAR_STACKS: tuple[tuple[tuple[tuple[int, int], ...], float, bool], ...] = (
    (((192, 5),), 0.0, True),
    (((192, 1), (240, 3)), 0.1, True),
    (((240, 1), (260, 2)), 0.2, True),
    (((260, 1), (280, 2)), 0.3, True),
    (((280, 1), (300, 2)), 0.4, True),
    (((300, 1),), 0.5, False),
)


class ELUPaperCifarCNN(nn.Module):
    """The ELU paper's 11-layer CIFAR-100 CNN without batch norm, as far as the secondary sources describe it.

    Stacks of [layers x channels x kernel]: [1x192x5], [1x192x1, 1x240x3], [1x240x1, 1x260x2],
    [1x260x1, 1x280x2], [1x280x1, 1x300x2], [1x300x1], [1x``num_classes``x1]; dropout 0, 0.1, 0.2, 0.3, 0.4,
    0.5, 0 after the stacks; the last 1x1 conv is the classifier, averaged over the remaining positions.

    Approximations (the full paper is not available to us): padding is ``k // 2`` for odd kernels and 1 for
    the 2x2 kernels (each grows the map by one pixel) so that 32x32 inputs survive the pools; the 2x2 max-pool
    follows stacks 1-5 only (32 -> 16 -> 8 -> 4 -> 2 -> 1: stacks 6 and 7 see a 1x1 map, nothing left to pool);
    dropout sits after the pool; the classifier conv has no activation and is global-average-pooled; He init.

    Example:
        >>> m = ELUPaperCifarCNN()
        >>> m(torch.zeros(2, 3, 32, 32)).shape, sum(isinstance(x, torch.nn.Conv2d) for x in m.modules())
        (torch.Size([2, 100]), 11)
    """

    def __init__(
        self,
        num_classes: int = 100,
        activation: ActivationName = "elu",
        in_channels: int = 3,
        dropout: bool = True,
    ) -> None:
        super().__init__()
        stacks: list[nn.Module] = []
        channels = in_channels
        for layer_specs, p, pool in _ELU_CIFAR_STACKS:
            layers: list[nn.Module] = []
            for out_channels, k in layer_specs:
                padding = 1 if k == 2 else k // 2
                layers += [nn.Conv2d(channels, out_channels, k, padding=padding), make_activation(activation)]
                channels = out_channels
            if pool:
                layers.append(nn.MaxPool2d(2))
            if dropout and p > 0:
                layers.append(nn.Dropout(p))
            stacks.append(nn.Sequential(*layers))
        self.features = nn.Sequential(*stacks)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        _he_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)).mean(dim=(2, 3))


#: Per-sample input shape (C, H, W) each factory name expects; ``ImageClassifier`` uses it for example inputs.
MODEL_INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    "lenet300": (1, 28, 28),
    "lenet5": (1, 28, 28),
    "elu_mlp": (1, 28, 28),
    "resnet20": (3, 32, 32),
    "resnet56": (3, 32, 32),
    "vgg16": (3, 32, 32),
    "elu_cifar_cnn": (3, 32, 32),
    "resnet50": (3, 224, 224),
}


def _resnet50(num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    # torchvision's model, randomly initialized: nothing is downloaded
    return torchvision.models.resnet50(weights=None, num_classes=num_classes, **kwargs)


_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "lenet300": LeNet300100,
    "lenet5": LeNet5Caffe,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "vgg16": VGG16Cifar,
    "elu_mlp": ELUPaperMLP,
    "elu_cifar_cnn": ELUPaperCifarCNN,
    "resnet50": _resnet50,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a benchmark network by name; keyword arguments go to its constructor.

    Names: ``lenet300``, ``lenet5``, ``resnet20``, ``resnet56``, ``vgg16``, ``elu_mlp``, ``elu_cifar_cnn`` and
    ``resnet50`` (torchvision, random init: ``weights=None``).

    Example:
        >>> build_model("lenet5", num_classes=10)(torch.zeros(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(_FACTORIES)}") from None
    return factory(**kwargs)


class ImageClassifier(L.LightningModule):
    """Generic image classifier: cross-entropy, SGD or Adam, cosine or step schedule, torchmetrics accuracy.

    Logs epoch means ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc`` (progress bar), ``test/loss`` and
    ``test/acc``. ``configure_optimizers`` covers ``self.parameters()`` with one weight decay for all; plugins that add
    parameters (SCL masks) move them into their own group.

    Args:
        model: a factory name (see :func:`build_model`) or a ready ``nn.Module``.
        num_classes: output classes (passed to the factory, used by the metrics).
        lr: learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty on every parameter of ``self.parameters()``.
        nesterov: Nesterov momentum for SGD.
        optimizer: ``"sgd"`` or ``"adam"``.
        scheduler: ``"cosine"`` (over ``trainer.max_epochs``, or steps when only ``max_steps`` is set),
            ``"step"`` (x0.1 at 50% and 75% of the epochs) or ``"none"``.
        model_kwargs: extra constructor arguments for a named model (e.g. ``{"activation": "elu"}``).
        input_shape: per-sample input shape (C, H, W) for ``example_input_array``; by default derived from
            the model name, None for a module.
        label_smoothing: amount of label smoothing in the training loss, in [0, 1); validation and test losses
            are plain cross-entropy.

    Example:
        >>> clf = ImageClassifier("lenet300", num_classes=10)
        >>> clf(clf.example_input_array).shape
        torch.Size([1, 10])
    """

    def __init__(
        self,
        model: str | nn.Module = "lenet300",
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
        optimizer: Literal["sgd", "adam"] = "sgd",
        scheduler: Literal["cosine", "step", "none"] = "cosine",
        model_kwargs: dict[str, Any] | None = None,
        input_shape: tuple[int, ...] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if scheduler not in ("cosine", "step", "none"):
            raise ValueError(f"scheduler must be 'cosine', 'step' or 'none', got {scheduler!r}")
        # a module argument is not a hyperparameter (and not YAML-serializable): checkpoints need it passed again
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else None)
        if isinstance(model, str):
            self.model = build_model(model, num_classes=num_classes, **(model_kwargs or {}))
            input_shape = input_shape or MODEL_INPUT_SHAPES.get(model)
        else:
            if model_kwargs:
                raise ValueError("model_kwargs only apply to a model given by name")
            self.model = model
        if input_shape is not None:
            self.example_input_array = torch.zeros(1, *input_shape)
        self.num_classes = num_classes
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_loss(self, logits: torch.Tensor, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The loss ``training_step`` optimizes and logs; override it to change the objective (e.g. distillation).

        Example:
            >>> clf = ImageClassifier("lenet300", label_smoothing=0.1)
            >>> x, y = torch.zeros(2, 1, 28, 28), torch.tensor([3, 7])
            >>> bool(clf.training_loss(clf(x), (x, y)) > 0)
            True
        """
        return F.cross_entropy(logits, batch[1], label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self.training_loss(logits, batch)
        self._record("train", loss, self.train_acc, logits.detach(), y)
        return loss

    @torch.compiler.disable
    def _record(
        self, stage: str, loss: torch.Tensor, metric: MulticlassAccuracy, logits: torch.Tensor, y: torch.Tensor
    ) -> None:
        # Eager under torch.compile, for two reasons: torchmetrics counts updates in a Python int on the module,
        # which dynamo guards on (every step would recompile the step until dynamo gives up), and torch 2.13's
        # dynamo crashes tracing self.log (inspect.getfullargspec on a bound method).
        metric.update(logits, y)
        # epoch means under plain names (on_step and on_epoch together would log "_step"/"_epoch" variants)
        if stage == "train":
            self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
            self.log("train/acc", metric, on_step=False, on_epoch=True)
        else:
            self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True)
            self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=stage == "val")

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self._record(stage, loss, metric, logits, y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self(x)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params,
                lr=hp.lr,
                momentum=hp.momentum,
                weight_decay=hp.weight_decay,
                nesterov=hp.nesterov and hp.momentum > 0,  # torch rejects Nesterov without momentum
            )
        else:
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return opt
        max_epochs = self.trainer.max_epochs
        by_epoch = max_epochs is not None and max_epochs > 0
        horizon = max_epochs if by_epoch else int(self.trainer.estimated_stepping_batches)
        if hp.scheduler == "cosine":
            sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(horizon, 1))
        else:
            milestones = sorted({max(int(horizon * f), 1) for f in (0.5, 0.75)})
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch" if by_epoch else "step"}}
