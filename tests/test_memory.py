"""retain_freed_memory: glibc keeps freed blocks for reuse instead of faulting them back in every round."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from lightning_scl import memory
from lightning_scl.memory import retain_freed_memory

# One 16 MiB tensor, written then freed, in a fresh process, with glibc's own counters before, during and after:
# by default glibc maps a block that large on its own and unmaps it at free (the next one is faulted in again);
# retained, it comes from the heap and stays there, free for reuse.
_ONE_BLOCK = textwrap.dedent(
    """
    import ctypes, json, sys, torch
    from lightning_scl.memory import retain_freed_memory
    fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    libc = ctypes.CDLL(None)
    info = getattr(libc, "mallinfo2", None) or libc.mallinfo  # mallinfo2: glibc >= 2.33
    size_t = ctypes.c_size_t if hasattr(libc, "mallinfo2") else ctypes.c_int
    info.restype = type("MallInfo", (ctypes.Structure,), {"_fields_": [(f, size_t) for f in fields]})
    if sys.argv[1] == "retain":
        assert retain_freed_memory()
    before = info()
    block = torch.ones(4 * 2**20)
    during = info()
    del block
    after = info()
    print(json.dumps({"mapped": during.hblkhd - before.hblkhd, "kept": after.fordblks - before.fordblks}))
    """
)


def _one_block(allocator: str) -> dict[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", _ONE_BLOCK, allocator], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(memory._glibc() is None, reason="the thresholds exist in glibc's malloc only (Linux)")
def test_a_freed_block_stays_in_the_heap_instead_of_going_back_to_the_system():
    block = 16 * 2**20
    # (allocations made around the block take a little of the freed space: compare with 90% of the block)
    default = _one_block("default")
    assert default["mapped"] >= block and default["kept"] < 0.9 * block  # its own mapping, unmapped at free
    retained = _one_block("retain")
    assert retained["mapped"] < block and retained["kept"] >= 0.9 * block  # from the heap, kept there for reuse


def test_without_glibc_nothing_is_changed_and_it_says_so(monkeypatch):
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    assert retain_freed_memory() is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mmap_threshold": 64 * 2**20}, "above glibc's limit"),
        ({"mmap_threshold": -1}, "must be >= 0"),
        ({"trim_threshold": -5}, "must be >= 0"),
    ],
)
def test_bad_thresholds_are_refused_with_the_limit(kwargs, message):
    with pytest.raises(ValueError, match=message):
        retain_freed_memory(**kwargs)


@pytest.mark.parametrize("retain", [True, False])
def test_the_callback_retains_freed_memory_on_cpu_unless_told_not_to(monkeypatch, retain):
    from lightning_scl.callbacks import scl as scl_module
    from tests.conftest import MLP, loader, quiet_trainer

    calls = []
    monkeypatch.setattr(scl_module, "_retain_freed_memory", lambda: calls.append(1) or True)
    callback = scl_module.SparseConnectivityLearning(lam=0.1, retain_freed_memory=retain, report=False)
    quiet_trainer(callbacks=[callback], max_steps=2).fit(MLP(), loader())
    assert callback._retained_freed_memory is retain
    assert len(calls) == (1 if retain else 0)
