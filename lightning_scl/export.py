"""Export a model trained with connectivity masks: plain weights, a compressed file, a physically smaller model, ONNX.

Formats of :func:`export_pruned` (see :data:`FORMATS`):

=============== ===================================================================================================
``safetensors`` the plain ``state_dict`` (masks folded: ``W * H(m)``), keys those of the un-instrumented model
``state_dict``  the same, written with ``torch.save``
``compressed``  a safetensors file holding, per masked tensor, a 1-bit-per-connection packed mask and the kept values;
                :func:`load_pruned` restores the dense plain ``state_dict``
``shrunk``      a smaller model: output channels that are constant (every incoming connection off) or unused (every
                outgoing connection off) are removed with Torch-Pruning's ``DependencyGraph``; the file holds the
                weights and the pruning record that :func:`load_shrunk` replays onto a fresh instance
``onnx``        the plain model through ``torch.onnx.export``, checked against onnxruntime
``onnx_shrunk`` the shrunk model, likewise
=============== ===================================================================================================

Every write goes to a temporary file in the target directory which is renamed over the target only once complete,
so a failed export never leaves a partial file.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from lightning_scl.masking import inject_masks
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> _ = inject_masks(net)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = export_pruned(net, f"{tmp}/net.safetensors")
    ...     plain = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    ...     print(plain.load_state_dict(load_pruned(path)))
    <All keys matched successfully>
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import math
import os
import re
import shlex
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_scl.masking import (
    ConnectivityMask,
    _inference,
    eager_forward,
    fold_state_dict,
    has_masks,
    has_parametrizations,
    inject_masks,
    modes_restored,
)

__all__ = [
    "FORMATS",
    "export_pruned",
    "load_masked_checkpoint",
    "load_pruned",
    "load_shrunk",
    "main",
    "plain_copy",
    "replay_shrink",
    "shrink_model",
]

#: Formats understood by :func:`export_pruned`.
FORMATS = ("safetensors", "state_dict", "compressed", "shrunk", "onnx", "onnx_shrunk")
#: Default file suffix of each format (used by the CLI when no output path is given).
SUFFIXES = {
    "safetensors": ".safetensors",
    "state_dict": ".pt",
    "compressed": ".scl.safetensors",
    "shrunk": ".shrunk.pt",
    "onnx": ".onnx",
    "onnx_shrunk": ".shrunk.onnx",
}


def default_output_path(checkpoint: str | os.PathLike[str], format: str) -> Path:
    """Where an export of ``checkpoint`` goes by default: next to it, with the format's suffix, never onto it.

    Example:
        >>> default_output_path("runs/last.ckpt", "compressed").name
        'last.scl.safetensors'
        >>> default_output_path("runs/last.pt", "state_dict").name  # not the checkpoint itself
        'last.pruned.pt'
    """
    checkpoint = Path(checkpoint)
    output = checkpoint.with_name(checkpoint.stem + SUFFIXES[format])
    if output.name == checkpoint.name:
        output = checkpoint.with_name(checkpoint.stem + ".pruned" + SUFFIXES[format])
    return output


def refuse_overwriting_checkpoint(output: str | os.PathLike[str], checkpoint: str | os.PathLike[str]) -> None:
    """Raise ``ValueError`` when ``output`` is the file ``checkpoint`` (an export would replace the training state).

    Example:
        >>> refuse_overwriting_checkpoint("model.safetensors", "last.ckpt")  # different files: fine
    """
    output, checkpoint = Path(output), Path(checkpoint)
    if output.exists() and checkpoint.exists() and os.path.samefile(output, checkpoint):
        raise ValueError(
            f"Cannot export to {str(output)!r}: it is the checkpoint being exported, which would be replaced and its "
            "masks, optimizer state and training progress lost. Give another output path."
        )


_COMPRESSED_FORMAT = "lightning_scl.compressed"
_SHRUNK_FORMAT = "lightning_scl.shrunk"
_VERSION = 1
_RANDOM_PROBES = 8  # random samples added to the example when looking for constant channels
_META_KEY = "lightning_scl"
_BITS_PREFIX = "__scl_bits__/"
_VALUES_PREFIX = "__scl_values__/"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_ORIGINAL_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)parametrizations\.(?P<tensor>[^.]+)\.original$")

ExampleInput = torch.Tensor | tuple[torch.Tensor, ...]


# ---------------------------------------------------------------------------------------------------- writing


def _check_writable(path: Path) -> None:
    """Fail before any expensive work when ``path`` cannot be written."""
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"Cannot export to {str(path)!r}: it is a directory; give a file path")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(
            errno.ENOENT,
            f"Cannot export to {str(path)!r}: directory {str(parent)!r} does not exist; create it first "
            f"(mkdir -p {shlex.quote(str(parent))}) or export to an existing folder",
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES, f"Cannot export to {str(path)!r}: directory {str(parent)!r} is not writable"
        )


def _umask() -> int:
    try:  # Linux reports it; setting it to read it would briefly change it for every thread of the process
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success, delete it on any failure."""
    _check_writable(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise type(err)(err.errno, f"Cannot export to {str(path)!r}: {err.strerror}") from err
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file private (0600): give it the mode a plain open() would, or the replaced file's
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# ---------------------------------------------------------------------------------------------------- sources


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype not in (None, torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}") from None


def _mask_key(prefix: str, tensor: str) -> str:
    return f"{prefix}parametrizations.{tensor}.0.mask"


def _masked_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """``{plain_key: (original_key, mask_key)}`` for every masked tensor of a masked ``state_dict``."""
    out = {}
    for key in state_dict:
        match = _ORIGINAL_KEY.match(key)
        if match is not None and _mask_key(match["prefix"], match["tensor"]) in state_dict:  # not spectral_norm's
            prefix, tensor = match["prefix"], match["tensor"]
            out[f"{prefix}{tensor}"] = (key, _mask_key(prefix, tensor))
    return out


def _fold(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Plain ``state_dict`` plus ``{plain_key: gate}`` (boolean, in the mask's own shape) for each masked tensor.

    Folds with ``where(gate, W, 0)`` rather than ``W * gate`` so switched-off entries are +0.0 (never -0.0): the
    compressed format can then restore the folded tensors bit for bit.
    """
    plain = fold_state_dict(state_dict)  # validates masks and gives the plain key order
    gates = {}
    for key, (original_key, mask_key) in _masked_prefixes(state_dict).items():
        original = state_dict[original_key].detach()
        gate = state_dict[mask_key].detach() > 0
        plain[key] = torch.where(gate, original, original.new_zeros(()))
        gates[key] = gate
    return plain, gates


def _load_checkpoint_file(path: Path, accepts_model: bool = False, accepts_dict: bool = True) -> dict[str, Any]:
    """The checkpoint dict at ``path`` (``weights_only=True``); errors name the file and what to pass instead.

    ``accepts_model``/``accepts_dict``: what else the caller takes, offered in the message (a loaded dict lets a user
    load a trusted pickled checkpoint by hand).
    """
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"Checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in several types (KeyError on a text file, say)
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""  # torch's are long
        reason = f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__
        model = ", or the model itself" if accepts_model else ""
        manual = (
            " If it holds pickled Python objects and you trust it, pass torch.load(path, weights_only=False) instead."
            if accepts_dict
            else ""
        )
        raise ValueError(
            f"{str(path)!r} is not a checkpoint torch.load(weights_only=True) can read ({reason}): pass the .ckpt "
            f"file the Trainer wrote (<log dir>/checkpoints/){model}.{manual}"
        ) from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"Checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


def _checkpoint_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError("The checkpoint has no 'state_dict' of tensors: not a Lightning or torch checkpoint")
    return dict(state_dict)


def _describe_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor], what: str) -> str:
    def head(items: Sequence[str]) -> str:
        shown = ", ".join(items[:8])
        return shown + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

    missing = [repr(k) for k in expected if k not in found]
    unexpected = [repr(k) for k in found if k not in expected]
    shapes = [
        f"{k!r}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing from the checkpoint: {head(missing)}")
    if unexpected:
        parts.append(f"not in {what}: {head(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch: {head(shapes)}")
    return "; ".join(parts)


def load_masked_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    model_class: type[nn.Module] | nn.Module | Callable[[], nn.Module],
) -> nn.Module:
    """Rebuild the masked model of a checkpoint written during SCL training.

    Args:
        checkpoint: a ``.ckpt`` path (loaded with ``weights_only=True``) or an already loaded checkpoint dict (or a
            masked ``state_dict``).
        model_class: a LightningModule / ``nn.Module`` class, instantiated with the checkpoint's
            ``hyper_parameters``; a zero-argument factory; or an instance (copied, never modified).

    Masks are injected on the layers whose ``parametrizations.weight`` entries the checkpoint holds (granularity read
    from the mask shapes), then the state is loaded strictly. A checkpoint of another architecture raises
    ``ValueError`` naming the missing, unexpected and mis-shaped keys.

    Example:
        >>> from lightning_scl.masking import inject_masks
        >>> net = nn.Sequential(nn.Linear(3, 2))
        >>> _ = inject_masks(net, granularity="channel")
        >>> rebuilt = load_masked_checkpoint({"state_dict": net.state_dict()}, lambda: nn.Sequential(nn.Linear(3, 2)))
        >>> type(rebuilt[0]).__name__, torch.equal(rebuilt[0].weight, net[0].weight)
        ('ParametrizedLinear', True)
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = _load_checkpoint_file(Path(checkpoint))
    if not _masked_prefixes(_checkpoint_state_dict(checkpoint)):
        raise ValueError(
            "The checkpoint holds no connectivity masks (no '<layer>.parametrizations.weight.0.mask' entries): it was "
            "not written during SparseConnectivityLearning training. Export a masked model or such a checkpoint."
        )
    return _rebuild_from_checkpoint(checkpoint, model_class)


def _rebuild_from_checkpoint(checkpoint: Mapping[str, Any], model_class: Any) -> nn.Module:
    """``model_class`` built from the checkpoint, masks injected where it has them, its state loaded strictly.

    The one loader of :func:`load_masked_checkpoint` and :func:`lightning_scl.accounting.sparsity_report` (which also
    takes checkpoints without masks), so both name mismatched keys and the fix alike.
    """
    state_dict = _checkpoint_state_dict(checkpoint)
    model = _instantiate(model_class, checkpoint)
    meta = checkpoint.get(_META_KEY) if isinstance(checkpoint.get(_META_KEY), Mapping) else {}
    if not meta and "pytorch-lightning_version" in checkpoint and _masked_prefixes(state_dict):
        warnings.warn(
            "The checkpoint has no lightning_scl record (a weights-only checkpoint saved outside a fit with the "
            "callbacks, or edited): an ELU swap it was trained with cannot be known, so the model is rebuilt with "
            "the class's own activations. If it was trained with ELUSwap, pass an instance swapped the same way: "
            "lightning_scl.activations.apply_elu(Model(...), alpha=...).",
            stacklevel=3,
        )
    if isinstance(meta.get("elu_swap"), Mapping):
        # the trained function: without this, ONNX and shrunk exports of the checkpoint would compute ReLU
        _apply_recorded_swap(model, meta["elu_swap"])
    record = meta.get("scl", {})
    # Equal mask and weight shapes mean weight granularity, except for a channel mask on a single-input unit
    # (Linear(1, n), 1x1 conv on one channel): there the run's recorded granularity decides.
    recorded = record.get("granularity") if record.get("layers") else None
    by_granularity: dict[str, list[tuple[str, nn.Module]]] = {"weight": [], "channel": []}
    for key, (original_key, mask_key) in _masked_prefixes(state_dict).items():
        layer_name, _, tensor = key.rpartition(".")
        if tensor != "weight" or mask_key not in state_dict:
            continue
        try:
            layer = model.get_submodule(layer_name)
        except AttributeError:
            continue  # reported below as unexpected keys
        if not isinstance(getattr(layer, "weight", None), torch.Tensor):
            continue
        same = tuple(state_dict[mask_key].shape) == tuple(state_dict[original_key].shape)
        granularity = (recorded if recorded in by_granularity else "weight") if same else "channel"
        by_granularity[granularity].append((layer_name, layer))
    for granularity, layers in by_granularity.items():
        if layers:
            inject_masks(
                model,
                layers,
                granularity=granularity,
                init=float(record.get("mask_init", 1.0)),
                ste=str(record.get("ste", "identity")),
                slope=float(record.get("ste_slope", 0.1)),
            )
    expected = model.state_dict()
    problem = _describe_mismatch(expected, state_dict, f"{type(model).__name__}")
    if problem:
        raise ValueError(
            f"The checkpoint does not match {type(model).__name__}: {problem}. Pass the model class (or a factory or "
            "instance) the checkpoint was trained with; it is built with the checkpoint's hyper_parameters."
        )
    model.load_state_dict(state_dict, strict=True)
    return model


def _apply_recorded_swap(model: nn.Module, record: Mapping[str, Any]) -> None:
    from lightning_scl.activations import apply_elu, swap_report

    if swap_report(model) is None:  # an instance passed in may already be swapped
        apply_elu(model, dict(record))


def _swap_record(model: nn.Module) -> dict[str, Any] | None:
    from lightning_scl.activations import swap_report

    report = swap_report(model)
    return None if report is None else report.to_record()


def constructor_hparams(hparams: Mapping[str, Any] | None) -> dict[str, Any]:
    """A checkpoint's ``hyper_parameters`` as constructor arguments: LightningCLI's private entries dropped.

    ``LightningCLI(load_from_checkpoint_support=True)`` (its default) adds ``_instantiator`` and ``_class_path``,
    which no ``__init__`` accepts.

    Example:
        >>> constructor_hparams({"hidden": 8, "_instantiator": "lightning.pytorch.cli.instantiate_module"})
        {'hidden': 8}
    """
    return {k: v for k, v in (hparams or {}).items() if not str(k).startswith("_")}


def _construct(model_class: type, hparams: Mapping[str, Any] | None) -> nn.Module:
    kwargs = constructor_hparams(hparams)
    try:
        return model_class(**kwargs)
    except TypeError as err:
        raise ValueError(
            f"Could not instantiate {model_class.__name__} with the checkpoint's hyper_parameters "
            f"{sorted(kwargs)}: {err}. Pass an instance or a factory instead."
        ) from err


def _instantiate(model_class: Any, checkpoint: Mapping[str, Any]) -> nn.Module:
    if isinstance(model_class, nn.Module):
        if has_masks(model_class):
            raise ValueError("Pass a plain (un-masked) instance of the model: masks are rebuilt from the checkpoint")
        return _detached_deepcopy(model_class)
    if model_class is None:
        raise ValueError(
            "This export needs the model: pass model_class (the LightningModule class, a factory, or an instance)"
        )
    if isinstance(model_class, type):
        model = _construct(model_class, checkpoint.get("hyper_parameters"))
    else:
        model = model_class()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model_class produced a {type(model).__name__}, not an nn.Module")
    return model


def _detached_deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that leaves a LightningModule's trainer/fabric references out of the copy."""
    memo: dict[int, Any] = {}
    for attr in ("_trainer", "_fabric"):
        obj = model.__dict__.get(attr)
        if obj is not None:
            memo[id(obj)] = None
    return copy.deepcopy(model, memo)


def plain_copy(model: nn.Module) -> nn.Module:
    """A copy of a masked model with the masks folded into plain weights; the original is left untouched.

    ``strip_masks`` on a ``copy.deepcopy`` is unsafe: the copy shares the parametrized class that
    ``torch.nn.utils.parametrize`` created for the original, and removing the parametrization deletes the
    ``weight`` property from that shared class, breaking the original. This undoes the parametrization per instance.
    Other parametrizations (``spectral_norm``, ``weight_norm``...) are folded too, to the value they give in eval
    mode: the copy is the inference model.

    Example:
        >>> from lightning_scl.masking import inject_masks
        >>> net = nn.Sequential(nn.Linear(2, 2))
        >>> _ = inject_masks(net)
        >>> type(plain_copy(net)[0]).__name__, type(net[0]).__name__
        ('Linear', 'ParametrizedLinear')
    """
    clone = _detached_deepcopy(model)
    folded: dict[int, nn.Parameter] = {}  # tied weights stay tied
    for layer in list(clone.modules()):
        if not parametrize.is_parametrized(layer):
            continue
        new_params = {}
        for tensor_name, plist in layer.parametrizations.items():
            # "original", or "original0", "original1"... for a parametrization of several tensors (weight_norm)
            originals = list(plist.parameters(recurse=False))
            param = folded.get(id(originals[0]))
            if param is None:
                with torch.no_grad():
                    if len(plist) == 1 and isinstance(plist[0], ConnectivityMask):
                        original = plist.original  # exact where W is inf, unlike W * 0
                        value = torch.where(plist[0].gate(), original, original.new_zeros(()))
                    else:
                        with modes_restored(layer):
                            layer.eval()  # spectral_norm runs a power iteration per access in train mode
                            value = getattr(layer, tensor_name).detach().clone()
                requires_grad = any(p.requires_grad for p in originals)
                param = folded[id(originals[0])] = nn.Parameter(value, requires_grad=requires_grad)
            new_params[tensor_name] = param
        del layer._modules["parametrizations"]
        layer.__class__ = type(layer).__bases__[0]
        for tensor_name, param in new_params.items():
            layer.register_parameter(tensor_name, param)
    return clone


# ---------------------------------------------------------------------------------------------------- compressed


def _pack_bits(gate: torch.Tensor) -> torch.Tensor:
    """Little-endian bit packing: bit ``i % 8`` of byte ``i // 8`` is element ``i`` of the flattened gate."""
    flat = gate.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def _unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = (packed.view(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()


def _checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key].detach().contiguous().reshape(-1)
        digest.update(f"{key}|{value.dtype}|{tuple(tensors[key].shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cast(key: str, value: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``value`` in the export dtype; a finite value that overflows it (float16 tops out at 65504) is an error."""
    if dtype is None or not value.is_floating_point() or value.dtype == dtype:
        return value
    cast = value.to(dtype)
    overflow = torch.isfinite(value) & ~torch.isfinite(cast)
    if bool(overflow.any()):
        largest = float(value[overflow].abs().max())
        raise ValueError(
            f"{key!r} holds {int(overflow.sum())} value(s) up to {largest:.6g} that {dtype} cannot represent (they "
            f"would become inf). Export with dtype='float32' (or 'bfloat16', which has float32's range)."
        )
    return cast


def _write_compressed(
    plain: Mapping[str, torch.Tensor], gates: Mapping[str, torch.Tensor], path: Path, dtype: torch.dtype | None
) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    masked_meta: dict[str, Any] = {}
    plain_meta: dict[str, Any] = {}
    for key, value in plain.items():
        value = value.detach().cpu()
        stored = _cast(key, value, dtype)
        if key in gates:
            gate = gates[key].cpu()
            values = stored[gate.expand_as(stored)]
            tensors[_BITS_PREFIX + key] = _pack_bits(gate)
            tensors[_VALUES_PREFIX + key] = values.contiguous()
            masked_meta[key] = {
                "shape": list(value.shape),
                "mask_shape": list(gate.shape),
                "dtype": _dtype_name(value.dtype),
                "kept": int(values.numel()),
            }
        else:
            tensors[key] = stored.contiguous().clone()  # clone: safetensors refuses tensors sharing storage
            plain_meta[key] = {"dtype": _dtype_name(value.dtype)}
    meta = {
        "format": _COMPRESSED_FORMAT,
        "version": _VERSION,
        "order": list(plain),
        "masked": masked_meta,
        "plain": plain_meta,
        "sha256": _checksum(tensors),
    }
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(meta, separators=(",", ":"))})


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(errno.ENOENT, f"{str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no iter)
    except Exception as err:  # SafetensorError, OSError on truncation...
        raise ValueError(
            f"{str(path)!r} is not a readable safetensors file (corrupted or truncated?): {err}. Check that the copy "
            "is complete (compare file sizes), or export it again."
        ) from err
    return tensors, metadata


#: The fix for a corrupted export: its bytes cannot be repaired, only written or copied again.
_REDO = "Export it again from the checkpoint or the trained model, or copy it again if it was transferred."


def load_pruned(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an export written by :func:`export_pruned` back as the dense plain ``state_dict``.

    Reads the ``compressed`` format (masks unpacked, kept values scattered back, each tensor in its original dtype;
    bit-exact when exported with the model's own dtype), plain ``safetensors`` and ``state_dict`` files.
    A corrupted compressed file raises ``ValueError`` (its checksum is verified).

    Example:
        >>> import tempfile
        >>> from lightning_scl.masking import inject_masks
        >>> net = nn.Linear(16, 4)
        >>> _ = inject_masks(net, layers=[("", net)])
        >>> with torch.no_grad():
        ...     net.parametrizations.weight[0].mask[:, 8:] = -1.0
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     restored = load_pruned(export_pruned(net, f"{tmp}/net.scl.safetensors", format="compressed"))
        >>> torch.equal(restored["weight"], net.weight), sorted(restored)
        (True, ['bias', 'weight'])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"{str(path)!r} does not exist")
    with open(path, "rb") as handle:
        is_zip = handle.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive; safetensors starts with a length
    if is_zip:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(loaded, dict) and loaded.get("format") == _SHRUNK_FORMAT:
            raise ValueError(f"{str(path)!r} is a shrunk model: use load_shrunk(path, model_factory_or_instance)")
        return dict(loaded)
    tensors, metadata = _read_safetensors(path)
    if _META_KEY not in metadata:
        if any(k.startswith(_BITS_PREFIX) for k in tensors):
            raise ValueError(f"{str(path)!r} holds packed masks but no lightning_scl metadata: corrupted file. {_REDO}")
        return tensors  # a safetensors file from elsewhere
    try:
        meta = json.loads(metadata[_META_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r}: unreadable lightning_scl metadata (corrupted file): {err}. {_REDO}") from err
    if meta.get("format") != _COMPRESSED_FORMAT:
        order = [k for k in meta.get("order", []) if k in tensors]
        return {k: tensors[k] for k in order + sorted(set(tensors) - set(order))}
    if int(meta.get("version", 0)) > _VERSION:
        raise ValueError(f"{str(path)!r} was written by a newer lightning_scl (format version {meta['version']})")
    if _checksum(tensors) != meta.get("sha256"):
        raise ValueError(f"{str(path)!r} is corrupted: its checksum does not match the stored one. {_REDO}")
    out: dict[str, torch.Tensor] = {}
    for key in meta["order"]:
        if key in meta["masked"]:
            info = meta["masked"][key]
            shape, mask_shape = torch.Size(info["shape"]), torch.Size(info["mask_shape"])
            gate = _unpack_bits(tensors[_BITS_PREFIX + key], mask_shape.numel()).view(mask_shape).expand(shape)
            values = tensors[_VALUES_PREFIX + key]
            if int(gate.sum()) != values.numel():
                raise ValueError(f"{str(path)!r} is corrupted: mask and kept values of {key!r} disagree. {_REDO}")
            dense = torch.zeros(shape, dtype=values.dtype)
            dense[gate] = values
            out[key] = dense.to(getattr(torch, info["dtype"]))
        else:
            out[key] = tensors[key].to(getattr(torch, meta["plain"][key]["dtype"]))
    return out


# ---------------------------------------------------------------------------------------------------- shrink


def _as_tuple(example_input: ExampleInput) -> tuple[torch.Tensor, ...]:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def _call(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Any:
    return model(*inputs)


def _flat_tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in _flat_tensors(v)]
    if isinstance(output, (list, tuple)):
        return [t for v in output for t in _flat_tensors(v)]
    return []


def _probe_inputs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The example's first sample plus random ones, for every input at once: a constant-channel check on one (often
    all-zero) sample is weak, a unit fed by a zeroed second input looks constant on it, and a unit that a ReLU
    silences for one sign of an input looks constant on one random sample; eight make that unlikely.

    Random values are drawn within the example's range (standard normal when the example is constant, as an
    all-zero one is), then in [0, 1) if the model's output is not finite on them (a ``log`` or ``sqrt`` of the
    input). Inputs that are not floating point repeat their first sample. When neither probe runs with a finite
    output (or an input has no batch dimension), the example itself is the probe."""
    if not inputs or not all(t.dim() >= 1 and len(t) >= 1 for t in inputs):
        return inputs
    for draw in ("example_range", "unit_interval"):
        generator = torch.Generator().manual_seed(0)
        probe = []
        for tensor in inputs:
            first = tensor[:1]
            if tensor.is_floating_point():
                shape = (_RANDOM_PROBES, *first.shape[1:])
                low, high = float(tensor.min()), float(tensor.max())
                if draw == "unit_interval":
                    rest = torch.rand(shape, generator=generator, dtype=first.dtype)
                elif math.isfinite(low) and math.isfinite(high) and high > low:
                    rest = low + (high - low) * torch.rand(shape, generator=generator, dtype=first.dtype)
                else:
                    rest = torch.randn(shape, generator=generator, dtype=first.dtype)
                rest = rest.to(first.device)
            else:
                rest = first.expand(_RANDOM_PROBES, *first.shape[1:])
            probe.append(torch.cat([first, rest]))
        if _finite_like_the_example(model, tuple(probe)):
            return tuple(probe)
    return inputs


def _finite_like_the_example(model: nn.Module, probe: tuple[torch.Tensor, ...]) -> bool:
    """Whether the random samples of ``probe`` leave the model's outputs finite wherever its first sample (the
    example's) does: an output that is -inf by design (a masked-out class) must not disqualify the probe."""
    try:
        with torch.no_grad():
            outputs = _flat_tensors(_call(model, probe))
    except Exception:
        return False
    for out in outputs:
        if not out.is_floating_point():
            continue
        bad = ~torch.isfinite(out)
        if out.dim() >= 1 and len(out) == len(probe[0]):
            if not torch.equal(bad, bad[:1].expand_as(bad)):
                return False
        elif bool(bad.any()):
            return False
    return True


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


def _is_transposed(module: nn.Module) -> bool:
    return _is_conv(module) and bool(module.transposed)


def _out_dim(module: nn.Module) -> int:
    return 1 if _is_transposed(module) else 0


def _in_dim(module: nn.Module) -> int:
    return 0 if _is_transposed(module) else 1


def _nonzero_along(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Boolean per index of ``dim``: whether any weight entry in that slice is non-zero."""
    return (weight.detach() != 0).movedim(dim, 0).reshape(weight.shape[dim], -1).any(dim=1)


def _bias_foldable(module: nn.Module) -> bool:
    """Whether a constant input channel contributes the same amount at every output position of ``module``.

    True for Linear and for convolutions without zero padding (reflect/replicate/circular padding of a constant
    is the constant). A zero-padded convolution sees the constant inside and zeros at the border, and a
    transposed convolution overlaps fewer kernel taps at its edges: both are position dependent.
    """
    if isinstance(module, nn.Linear):
        return True
    if not _is_conv(module) or module.transposed:
        return False
    if module.padding_mode != "zeros":
        return True
    if isinstance(module.padding, str):
        return module.padding == "valid" or all(k == 1 for k in module.kernel_size)
    return all(p == 0 for p in module.padding)


class _Shrinker:
    """One shrink run: decides per dependency group which channels can go and keeps the model's function exact."""

    def __init__(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        import torch_pruning as tp

        self.tp = tp
        self.model = model
        self.inputs = inputs
        self.probe = _probe_inputs(model, inputs)
        self.names = {module: name for name, module in model.named_modules()}
        self.added_bias: list[str] = []
        self.kept_for_exactness = 0
        self._captured: dict[nn.Module, list[torch.Tensor]] = {}
        self.kept_indices: dict[str, dict[str, list[int]]] = {}  # original indices still present, per layer/dim
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)
        self.terminal = self._modules_producing_outputs()
        # A weight held by several modules (tied): Torch-Pruning would rewrite it for one of them and untie it.
        holders: dict[int, int] = {}
        for module in model.modules():
            for param in module.parameters(recurse=False):
                holders[id(param)] = holders.get(id(param), 0) + 1
        self.tied = {pid for pid, count in holders.items() if count > 1}

    def _modules_producing_outputs(self) -> set[nn.Module]:
        """Modules whose output tensor the model returns as is: their channels are the model's output shape."""
        produced: dict[int, tuple[nn.Module, torch.Tensor]] = {}

        def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            for t in _flat_tensors(output):
                # setdefault: hooks fire innermost first, and containers return their last child's tensor.
                # Holding the tensor keeps its id from being reused during the forward.
                produced.setdefault(id(t), (module, t))

        hooks = [m.register_forward_hook(hook) for m in self.model.modules()]
        try:
            with torch.no_grad():
                outputs = _flat_tensors(_call(self.model, self.inputs))
        finally:
            for h in hooks:
                h.remove()
        return {produced[id(t)][0] for t in outputs if id(t) in produced and produced[id(t)][1] is t}

    # ---------------------------------------------------------------- group analysis

    def _members(self, group: Any) -> list[tuple[str, nn.Module, list[int], list[int]]] | None:
        """``(kind, module, idxs, root_idxs)`` per group item; None if the group holds an op we cannot reason about."""
        ops = self.tp.ops
        passthrough = {ops.OPTYPE.BN, ops.OPTYPE.ELEMENTWISE, ops.OPTYPE.RESHAPE, ops.OPTYPE.CONCAT, ops.OPTYPE.SPLIT}
        members = []
        for item in group:
            dep, idxs, root_idxs = item.dep, list(item.idxs), list(item.root_idxs)
            node, module = dep.target, dep.target.module
            if isinstance(module, nn.Module) and any(id(p) in self.tied for p in module.parameters(recurse=False)):
                return None  # tied weights stay whole and tied
            if node.type in (ops.OPTYPE.CONV, ops.OPTYPE.LINEAR):
                if _is_conv(module) and module.groups != 1:
                    return None
                kind = "producer" if self.dg.is_out_channel_pruning_fn(dep.handler) else "consumer"
                if kind == "producer" and (module in self.terminal or not node.outputs):
                    return None  # the channel is part of the model's output
            elif node.type in passthrough:
                if not node.outputs or module in self.terminal:
                    return None
                kind = "pass"
            else:
                return None  # the model output, norms over channels, depthwise/grouped convs, raw parameters...
            members.append((kind, module, idxs, root_idxs))
        return members

    @staticmethod
    def _by_root(idxs: list[int], root_idxs: list[int]) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i, r in zip(idxs, root_idxs):
            out.setdefault(int(r), []).append(int(i))
        return out

    def _consumer_inputs(self, consumers: list[nn.Module]) -> dict[nn.Module, list[torch.Tensor]]:
        """Inputs of every conv/linear layer on the probe batch, cached until a layer's input width changes.

        Pruning a group is exact, so values stay valid; only the layout of the pruned group's own inputs changes,
        and a group is pruned at most once between probes of the layers it feeds.
        """
        stale = any(
            m not in self._captured
            or self._captured[m][0].shape[-1 if isinstance(m, nn.Linear) else 1]
            != (m.in_features if isinstance(m, nn.Linear) else m.in_channels)
            for m in consumers
        )
        if stale:
            layers = [m for m in self.model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
            captured: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in layers}
            hooks = [
                m.register_forward_pre_hook(lambda mod, args: captured[mod].append(args[0].detach())) for m in layers
            ]
            try:
                with torch.no_grad():
                    _call(self.model, self.probe)
            finally:
                for h in hooks:
                    h.remove()
            self._captured = {m: xs for m, xs in captured.items() if xs}
        return {m: self._captured.get(m, []) for m in consumers}

    @staticmethod
    def _constant(inputs: list[torch.Tensor], module: nn.Module, index: int) -> float | None:
        """The value of input channel ``index`` of ``module`` if it is the same everywhere, else None."""
        values = []
        for x in inputs:
            if isinstance(module, nn.Linear):
                values.append(x[..., index].reshape(-1))
            else:
                values.append(x[:, index].reshape(-1))
        if not values:
            return None  # the layer was not called on the probe batch
        flat = torch.cat(values).double()
        if flat.numel() == 0 or not bool(torch.isfinite(flat).all()):
            return None  # NaN compares false with everything: it would pass the test below as constant
        c = float(flat.mean())
        if float((flat - c).abs().max()) > 1e-5 * (1.0 + abs(c)):
            return None
        return c

    def shrink_group(self, group: Any) -> bool:
        members = self._members(group)
        if members is None:
            return False
        root = group[0].dep.target.module
        n_root = len(group[0].idxs)
        producers = [(m, self._by_root(i, r)) for kind, m, i, r in members if kind == "producer"]
        consumers = [(m, self._by_root(i, r)) for kind, m, i, r in members if kind == "consumer"]
        alive_rows = {m: _nonzero_along(m.weight, _out_dim(m)) for m, _ in producers}
        used_cols = {m: _nonzero_along(m.weight, _in_dim(m)) for m, _ in consumers}
        channels = range(n_root)
        unused = [r for r in channels if not any(bool(used_cols[m][i]) for m, by in consumers for i in by.get(r, []))]
        dead = [
            r
            for r in channels
            if r not in set(unused) and not any(bool(alive_rows[m][i]) for m, by in producers for i in by.get(r, []))
        ]
        if not unused and not dead:
            return False

        # Constant value each dead channel takes at each consumer input (probed, and checked to be constant).
        constants: dict[nn.Module, dict[int, list[float]]] = {}
        if dead:
            captured = self._consumer_inputs([m for m, _ in consumers])
            for m, by in consumers:
                constants[m] = {}
                for r in list(dead):
                    values = [self._constant(captured[m], m, i) for i in by.get(r, [])]
                    if any(v is None for v in values):
                        dead.remove(r)  # not constant after all (an op the graph does not model): keep it
                        for other in constants.values():
                            other.pop(r, None)
                        continue
                    constants[m][r] = values  # type: ignore[assignment]

        # Zero-padded convs cannot absorb a constant channel into their bias: the border sees zeros. Route such
        # channels through a kept "carrier" dead channel instead (its column absorbs theirs, scaled by c_r / c_carrier).
        carrier_for: dict[nn.Module, int] = {}
        carriers: list[int] = []
        needy = {
            m: [r for r in dead if any(v != 0.0 for v in constants[m][r])]
            for m, by in consumers
            if not _bias_foldable(m)
        }
        needy = {m: rs for m, rs in needy.items() if rs}
        if any(len(by.get(r, [])) != 1 for m, by in consumers if m in needy for r in dead):
            blocked = {r for rs in needy.values() for r in rs}
            dead = [r for r in dead if r not in blocked]  # a channel spread over several inputs: keep, stay exact
            self.kept_for_exactness += len(blocked)
            needy = {}
        uncovered = set(needy)
        while uncovered:
            best = max(
                dead,
                key=lambda r: (
                    sum(1 for m in uncovered if constants[m][r][0] != 0.0),
                    min((abs(constants[m][r][0]) for m in uncovered if constants[m][r][0] != 0.0), default=0.0),
                ),
            )
            carriers.append(best)
            for m in [m for m in uncovered if constants[m][best][0] != 0.0]:
                carrier_for[m] = best
                uncovered.discard(m)
        remove = sorted(set(unused) | (set(dead) - set(carriers)))
        self.kept_for_exactness += len(carriers)
        if len(remove) >= n_root:  # a layer needs at least one channel
            remove = remove[:-1]
        if not remove:
            return False
        pruning_group = self.dg.get_pruning_group(root, self.dg.get_pruner_of_module(root).prune_out_channels, remove)
        if not self.dg.check_pruning_group(pruning_group):
            return False

        removed_dead = [r for r in remove if r in set(dead)]
        with torch.no_grad():
            for m, by in consumers:
                in_dim = _in_dim(m)
                weight = m.weight
                if _bias_foldable(m):
                    delta = None
                    for r in removed_dead:
                        for i, c in zip(by.get(r, []), constants[m][r]):
                            if c == 0.0:
                                continue
                            column = weight.select(in_dim, i)  # (out, *kernel)
                            contribution = column.reshape(column.shape[0], -1).sum(dim=1).double() * c
                            delta = contribution if delta is None else delta + contribution
                    if delta is not None:
                        self._add_to_bias(m, delta)
                elif m in carrier_for:
                    carrier = carrier_for[m]
                    j0, c0 = by[carrier][0], constants[m][carrier][0]
                    target = weight.select(in_dim, j0)
                    extra = torch.zeros_like(target, dtype=torch.float64)
                    for r in removed_dead:
                        c = constants[m][r][0]
                        if c != 0.0:
                            extra += weight.select(in_dim, by[r][0]).double() * (c / c0)
                    target.add_(extra.to(target.dtype))
        self._track_kept(pruning_group)
        pruning_group.prune()
        return True

    def _track_kept(self, pruning_group: Any) -> None:
        for item in pruning_group:
            module = item.dep.target.module
            if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
                continue
            is_out = isinstance(module, nn.modules.batchnorm._BatchNorm) or self.dg.is_out_channel_pruning_fn(
                item.dep.handler
            )
            dim = "out" if is_out else "in"
            weight = module.weight if not isinstance(module, nn.modules.batchnorm._BatchNorm) else None
            size = (
                module.num_features if weight is None else weight.shape[_out_dim(module) if is_out else _in_dim(module)]
            )
            entry = self.kept_indices.setdefault(self.names[module], {})
            current = entry.get(dim, list(range(size)))
            gone = set(int(i) for i in item.idxs)
            entry[dim] = [k for pos, k in enumerate(current) if pos not in gone]

    def _add_to_bias(self, module: nn.Module, delta: torch.Tensor) -> None:
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros_like(delta, dtype=module.weight.dtype))
            self.added_bias.append(self.names[module])
        module.bias.add_(delta.to(module.bias.dtype))

    def run(self) -> None:
        conv_linear = (self.tp.ops.TORCH_CONV, self.tp.ops.TORCH_LINEAR)
        changed = True
        while changed:  # removing a channel can leave a next-layer unit dead or an earlier one unused
            changed = False
            self.kept_for_exactness = 0  # the last pass, which removes nothing, counts what stays
            for group in self.dg.get_all_groups(root_module_types=conv_linear):
                changed |= self.shrink_group(group)

    def record(self) -> dict[str, Any]:
        history = [
            [str(name), bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in self.dg.pruning_history()
        ]
        return {
            "format": _SHRUNK_FORMAT,
            "version": _VERSION,
            "pruning_history": history,
            "added_bias": list(self.added_bias),
            "kept_indices": {name: dict(dims) for name, dims in self.kept_indices.items()},
            "example_inputs": [{"shape": list(x.shape), "dtype": _dtype_name(x.dtype)} for x in self.inputs],
        }


def _example_inputs(model: nn.Module, example_input: ExampleInput | None, what: str) -> tuple[torch.Tensor, ...]:
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
    if example_input is None:
        raise ValueError(
            f"{what} needs example_input: a batch shaped like the model's input (e.g. torch.zeros(1, 3, 32, 32)), "
            "or set example_input_array on the LightningModule."
        )
    inputs = _as_tuple(example_input)
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        raise ValueError("example_input must be a tensor or a tuple of tensors")
    try:  # here, not deep inside Torch-Pruning's or the ONNX exporter's tracing where the error would be unrelated
        with _inference(model) as module:
            _call(module, inputs)
    except Exception as err:
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs)
        kinds = ", ".join(f"{x.dtype} on {x.device}" for x in inputs)
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"{what}: {type(model).__name__} cannot run on the example input of shape {shapes} ({kinds}): "
            f"{type(err).__name__}: {first_line}. Give a batch shaped like the model's input, of its dtype and on its "
            "device (example_input=..., --input-shape on the command line), or set example_input_array on the "
            "LightningModule."
        ) from err
    return inputs


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shrink_model(
    model: nn.Module, example_input: ExampleInput | None = None, check: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """A physically smaller copy of a masked (or plain) model, and the record that rebuilds its structure.

    Masks are folded first. Then, for every dependency group of Torch-Pruning's ``DependencyGraph`` (a layer's
    output channels with the BatchNorms, residual adds, concatenations and next layers' inputs tied to them), a
    channel is removed when

    - it is *unused*: every connection out of it is off in every consuming layer, or
    - it is *dead*: every connection into it is off in every producing layer, so it carries a constant (its bias,
      through BatchNorm and activation). The constant is folded into each consuming layer's bias (a bias is added
      where the layer has none). A zero-padded convolution sees that constant only inside the border, which a
      bias cannot express: there the dead channels of a group are merged into one kept dead "carrier" channel
      (at most one per such consumer), exact again.

    Channels that reach the model's output, and groups that hold ops the graph cannot reason about (grouped
    convolutions, LayerNorm...), are kept. The model's own input features are never removed. The result (in eval
    mode) is checked against the masked model on ``example_input`` plus random samples.

    Args:
        model: a masked model (or a plain one whose zero rows/columns should be removed); not modified.
        example_input: a batch shaped like the input (default: ``model.example_input_array``).
        check: compare the outputs of the shrunk and the masked model; raise if they differ.

    Returns:
        ``(shrunk_model, record)``; ``record`` (plain lists, ints and strings, ``weights_only``-safe) holds the
        Torch-Pruning history and the layers that gained a bias, for :func:`replay_shrink`; ``kept_indices``
        (``{layer: {"out"|"in": original indices kept}}``); ``params_before``/``params_after``; and
        ``kept_for_exactness``, the dead channels kept as carriers or because their value was not constant.

    Example:
        >>> from lightning_scl.masking import inject_masks
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = inject_masks(net, granularity="channel")
        >>> with torch.no_grad():
        ...     net[0].parametrizations.weight[0].mask[:5] = -1.0  # 5 of 8 hidden units off
        >>> small, record = shrink_model(net, torch.randn(3, 4))
        >>> small[0].out_features, small[2].in_features
        (3, 3)
        >>> torch.allclose(small(torch.ones(1, 4)), net.eval()(torch.ones(1, 4)), atol=1e-6)
        True
    """
    with eager_forward(model) as module:  # a compiled model: its own layers, run eagerly (no recompiles per shape)
        return _shrink(module, example_input, check)


def _shrink(model: nn.Module, example_input: ExampleInput | None, check: bool) -> tuple[nn.Module, dict[str, Any]]:
    inputs = _example_inputs(model, example_input, "shrink_model")
    work = plain_copy(model) if has_parametrizations(model) else _detached_deepcopy(model)
    work.eval()
    params_before = _count_params(work)
    unmodelled = (
        "The model probably uses an operation Torch-Pruning's graph does not model correctly (a fixed channel "
        "permutation or shuffle, say); export with format='safetensors' instead and please report this model."
    )
    shrinker = _Shrinker(work, inputs)
    try:
        shrinker.run()
    except (RuntimeError, IndexError, ValueError) as err:  # a probe forward of a wrongly pruned model
        raise RuntimeError(f"shrink_model failed ({type(err).__name__}: {err}). {unmodelled}") from err
    record = shrinker.record()
    work.eval()
    record["params_before"] = params_before
    record["params_after"] = _count_params(work)
    record["kept_for_exactness"] = shrinker.kept_for_exactness
    if record["params_after"] > params_before:
        raise RuntimeError(
            f"shrink_model: the shrunk model has more parameters than the masked one ({record['params_after']:,} > "
            f"{params_before:,}). {unmodelled}"
        )
    if check:
        with _inference(model) as module:
            reference = _flat_tensors(_call(module, shrinker.probe))
            try:
                result = _flat_tensors(_call(work, shrinker.probe))
            except (RuntimeError, IndexError, ValueError) as err:
                raise RuntimeError(
                    f"shrink_model: the shrunk model does not run ({type(err).__name__}: {err}). {unmodelled}"
                ) from err
        for ref, out in zip(reference, result):
            scale = float(ref.abs().max()) if ref.numel() else 1.0
            atol = 1e-5 * max(1.0, scale if math.isfinite(scale) else 1.0)
            if ref.shape != out.shape or not torch.allclose(out, ref, rtol=1e-4, atol=atol, equal_nan=True):
                diff = "shape " + str(tuple(out.shape)) if ref.shape != out.shape else f"{(out - ref).abs().max():.3g}"
                raise RuntimeError(
                    f"shrink_model: the shrunk model's output differs from the masked model's (max abs diff {diff}). "
                    + unmodelled
                )
    return work, record


def replay_shrink(model: nn.Module, record: Mapping[str, Any]) -> nn.Module:
    """Give a fresh, un-masked instance the structure of a shrunk model, in place (weights still to be loaded).

    Replays Torch-Pruning's pruning history on a ``DependencyGraph`` traced with zero inputs of the recorded
    shapes, then adds the biases the shrink folded constants into.

    Example:
        >>> from lightning_scl.masking import inject_masks
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> _ = inject_masks(net)
        >>> with torch.no_grad():
        ...     net[2].parametrizations.weight[0].mask[:, :6] = -1.0  # 6 hidden units no longer used
        >>> small, record = shrink_model(net, torch.randn(1, 4))
        >>> fresh = replay_shrink(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), record)
        >>> fresh.load_state_dict(small.state_dict())
        <All keys matched successfully>
    """
    import torch_pruning as tp

    if record.get("format") != _SHRUNK_FORMAT:
        raise ValueError("Not a lightning_scl shrink record")
    if has_parametrizations(model):
        model = plain_copy(model)  # the shrunk model was made from the folded copy: masks, spectral_norm...
    inputs = tuple(torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"])) for spec in record["example_inputs"])
    with modes_restored(model), torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)
        try:
            dg.load_pruning_history([[name, is_out, list(idxs)] for name, is_out, idxs in record["pruning_history"]])
        except (AttributeError, IndexError, ValueError) as err:
            raise ValueError(f"Cannot replay the shrink record on {type(model).__name__}: {err}") from err
    for name in record.get("added_bias", []):
        layer = model.get_submodule(name)
        out = layer.weight.shape[_out_dim(layer)] * (layer.groups if _is_transposed(layer) else 1)
        layer.bias = nn.Parameter(torch.zeros(out, dtype=layer.weight.dtype, device=layer.weight.device))
    return model


def load_shrunk(
    path: str | os.PathLike, model_factory_or_instance: nn.Module | Callable[..., nn.Module] | type
) -> nn.Module:
    """Load a ``format="shrunk"`` export: rebuild the structure on a fresh instance, then load the weights.

    The file is read with ``torch.load(weights_only=True)``: no code is unpickled.

    Args:
        path: the ``.shrunk.pt`` file.
        model_factory_or_instance: a fresh (dense, un-masked) instance, a zero-argument factory, or a class (called
            with the stored ``hyper_parameters`` when the export came from a LightningModule that has them).

    Returns:
        The shrunk model, in eval mode.

    Example:
        >>> import tempfile
        >>> from lightning_scl.masking import inject_masks
        >>> make = lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> net = make()
        >>> _ = inject_masks(net, granularity="channel")
        >>> with torch.no_grad():
        ...     net[0].parametrizations.weight[0].mask[2:] = -1.0
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = export_pruned(net, f"{tmp}/net.shrunk.pt", format="shrunk", example_input=torch.zeros(1, 4))
        ...     small = load_shrunk(path, make)
        >>> small[0].weight.shape
        torch.Size([2, 4])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, f"{str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{str(path)!r} is not a readable shrunk export: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != _SHRUNK_FORMAT:
        raise ValueError(f"{str(path)!r} is not a lightning_scl shrunk export")
    record = payload["record"]
    if isinstance(model_factory_or_instance, nn.Module):
        model = model_factory_or_instance
    elif isinstance(model_factory_or_instance, type):
        model = _construct(model_factory_or_instance, payload.get("hyper_parameters"))
    else:
        model = model_factory_or_instance()
    if isinstance(payload.get("activation_swap"), Mapping):
        _apply_recorded_swap(model, payload["activation_swap"])  # dead-unit constants were folded through it
    model = replay_shrink(model, record)
    problem = _describe_mismatch(model.state_dict(), payload["state_dict"], "the rebuilt model")
    if problem:
        raise ValueError(f"The shrunk export does not fit {type(model).__name__}: {problem}")
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- onnx


def _write_onnx(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> None:
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ImportError(
            "format='onnx' needs onnx, onnxscript and onnxruntime: pip install lightning-scl[onnx]"
        ) from err
    model.eval()
    with torch.no_grad():
        reference = [t.detach().cpu() for t in _flat_tensors(_call(model, inputs))]
    dynamo_error: Exception | None = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters are chatty about internals the user cannot act on
        try:
            torch.onnx.export(model, inputs, str(path), dynamo=True, external_data=False, verbose=False)
        except Exception as err:  # the torch.export-based exporter rejects some models (data-dependent control flow)
            dynamo_error = err
            try:
                torch.onnx.export(model, inputs, str(path), dynamo=False)
            except Exception as legacy_error:
                raise RuntimeError(
                    f"torch.onnx.export failed with dynamo=True ({dynamo_error}) and dynamo=False ({legacy_error})"
                ) from legacy_error
    if dynamo_error is not None:
        warnings.warn(
            f"torch.onnx.export(dynamo=True) failed ({dynamo_error}); exported with the TorchScript exporter instead",
            stacklevel=3,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {spec.name: x.detach().cpu().numpy() for spec, x in zip(session.get_inputs(), inputs)}
    outputs = [torch.from_numpy(o) for o in session.run(None, feeds)]
    for ref, out in zip(reference, outputs):
        scale = float(ref.abs().max()) if ref.numel() else 1.0
        if ref.shape != out.shape or not torch.allclose(out.to(ref.dtype), ref, rtol=1e-4, atol=1e-5 * max(1, scale)):
            raise RuntimeError("The ONNX model's onnxruntime output differs from torch's; nothing was written")


# ---------------------------------------------------------------------------------------------------- entry point


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def export_pruned(
    model_or_checkpoint: nn.Module | str | os.PathLike | Mapping[str, Any],
    path: str | os.PathLike,
    format: str = "safetensors",
    model_class: type[nn.Module] | nn.Module | Callable[[], nn.Module] | None = None,
    example_input: ExampleInput | None = None,
    dtype: str | torch.dtype | None = "float32",
) -> Path:
    """Export a model trained with connectivity masks (or its SCL checkpoint) in one of :data:`FORMATS`.

    Args:
        model_or_checkpoint: a masked ``nn.Module``/LightningModule, a ``.ckpt`` path written during SCL training,
            or a loaded checkpoint dict.
        path: the file to write (written to a temporary file first, then renamed: never left half-written).
        format: ``"safetensors"`` (default), ``"state_dict"``, ``"compressed"``, ``"shrunk"``, ``"onnx"`` or
            ``"onnx_shrunk"``.
        model_class: with a checkpoint: the LightningModule class (instantiated with the checkpoint's
            ``hyper_parameters``), a factory, or an instance; needed for ``shrunk`` and ``onnx*``, optional for the
            weight formats (given, it checks the checkpoint fits the class).
        example_input: an input batch for ``shrunk`` and ``onnx*`` (default: ``example_input_array``).
        dtype: floating tensors of the weight formats are stored in this dtype (``"float32"``, ``"float16"``,
            ``"bfloat16"``; None keeps each tensor's own). Not used by ``shrunk``/``onnx*``.

    Returns:
        The written path.

    The weight formats hold exactly the keys of the un-instrumented model (for a LightningModule: the LightningModule
    itself, e.g. ``model.fc1.weight``), so ``Model().load_state_dict(..., strict=True)`` works.

    Example:
        >>> import tempfile
        >>> from lightning_scl.masking import inject_masks
        >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> _ = inject_masks(net)
        >>> with torch.no_grad():
        ...     for _, layer in [("0", net[0]), ("2", net[2])]:
        ...         _ = layer.parametrizations.weight[0].mask.uniform_(-1, 0.02)  # about 2% kept
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     dense = export_pruned(net, f"{tmp}/a.safetensors").stat().st_size
        ...     small = export_pruned(net, f"{tmp}/a.scl.safetensors", format="compressed").stat().st_size
        >>> small < dense / 4
        True
    """
    if isinstance(model_or_checkpoint, nn.Module):
        # torch.compile's wrapper would prefix every key with "_orig_mod."; export the module it wraps, run eagerly
        with eager_forward(model_or_checkpoint) as module:
            return _export(module, path, format, model_class, example_input, dtype)
    return _export(model_or_checkpoint, path, format, model_class, example_input, dtype)


def _export(
    model_or_checkpoint: nn.Module | str | os.PathLike | Mapping[str, Any],
    path: str | os.PathLike,
    format: str,
    model_class: type[nn.Module] | nn.Module | Callable[[], nn.Module] | None,
    example_input: ExampleInput | None,
    dtype: str | torch.dtype | None,
) -> Path:
    if format not in FORMATS:
        raise ValueError(f"Unknown export format {format!r}; choose one of {list(FORMATS)}")
    path = Path(path)
    _check_writable(path)
    value_dtype = _resolve_dtype(dtype)
    needs_module = format in ("shrunk", "onnx", "onnx_shrunk")

    checkpoint: Mapping[str, Any] | None = None
    module: nn.Module | None = None
    if isinstance(model_or_checkpoint, nn.Module):
        module = model_or_checkpoint
        if not has_masks(module):
            raise ValueError(
                f"{type(module).__name__} has no connectivity masks: nothing to export. Train it with "
                "SparseConnectivityLearning (or call lightning_scl.masking.inject_masks) first."
            )
        state_dict = module.state_dict()
    else:
        if isinstance(model_or_checkpoint, (str, os.PathLike)):
            source = Path(model_or_checkpoint)
            refuse_overwriting_checkpoint(path, source)
            checkpoint = _load_checkpoint_file(source, accepts_model=True)
        elif isinstance(model_or_checkpoint, Mapping):
            checkpoint = model_or_checkpoint
        else:
            raise TypeError(
                f"model_or_checkpoint must be an nn.Module, a checkpoint path or dict, not {type(model_or_checkpoint)}"
            )
        state_dict = _checkpoint_state_dict(checkpoint)
        if not _masked_prefixes(state_dict):
            raise ValueError(
                "The checkpoint holds no connectivity masks (no '<layer>.parametrizations.weight.0.mask' entries): "
                "nothing to export. Was it written during SparseConnectivityLearning training?"
            )
        if needs_module and model_class is None:
            raise ValueError(f"format={format!r} from a checkpoint needs model_class (the LightningModule class)")
        if model_class is not None:
            module = load_masked_checkpoint(checkpoint, model_class)
            state_dict = module.state_dict()

    plain, gates = _fold(state_dict)
    density = sum(int(g.expand_as(plain[k]).sum()) for k, g in gates.items()) / max(
        1, sum(plain[k].numel() for k in gates)
    )
    with _atomic_target(path) as tmp:
        if format in ("safetensors", "state_dict"):
            out = {k: _cast(k, v.detach().cpu(), value_dtype) for k, v in plain.items()}
            if format == "state_dict":
                torch.save(out, tmp)
            else:
                from safetensors.torch import save_file

                info = {
                    "format": "plain",
                    "version": _VERSION,
                    "density": density,
                    "masked": sorted(gates),
                    "order": list(out),  # safetensors sorts its keys; keep the model's order for load_pruned
                }
                save_file(
                    {k: v.contiguous().clone() for k, v in out.items()},
                    str(tmp),
                    metadata={"format": "pt", _META_KEY: json.dumps(info)},
                )
        elif format == "compressed":
            _write_compressed(plain, gates, tmp, value_dtype)
        else:
            assert module is not None
            inputs = _example_inputs(module, example_input, f"format={format!r}")
            if format == "onnx":
                target = plain_copy(module).eval()
            else:
                target, record = shrink_model(module, inputs)
            if format == "shrunk":
                hparams = constructor_hparams(checkpoint.get("hyper_parameters")) if checkpoint else None
                if hparams is None:
                    hparams = constructor_hparams(getattr(module, "hparams", None)) or None
                payload = {
                    "format": _SHRUNK_FORMAT,
                    "version": _VERSION,
                    "record": record,
                    "state_dict": {k: v.detach().cpu() for k, v in target.state_dict().items()},
                    "hyper_parameters": hparams if hparams and _json_safe(hparams) else None,
                    "density": density,
                    "activation_swap": _swap_record(module),
                }
                torch.save(payload, tmp)
            else:
                _write_onnx(target, inputs, tmp)
    return path


# ---------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_scl.export CHECKPOINT --format ...``: the same as ``lightning-scl export``.

    Example:
        >>> import tempfile
        >>> from lightning_scl.masking import inject_masks
        >>> net = nn.Sequential(nn.Linear(4, 2))
        >>> _ = inject_masks(net)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     torch.save({"state_dict": net.state_dict()}, f"{tmp}/run.ckpt")
        ...     main([f"{tmp}/run.ckpt", "--format", "compressed"])
        ...     sorted(load_pruned(f"{tmp}/run.scl.safetensors"))  # doctest: +ELLIPSIS
        wrote ...run.scl.safetensors (...)
        0
        ['0.bias', '0.weight']
    """
    from lightning_scl.cli import main as cli_main

    # One command line: `python -m lightning_scl.export` is `lightning-scl export`, with its checks and messages.
    return cli_main(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
