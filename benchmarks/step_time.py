"""Training cost: wall time per optimizer step, dense vs SCL vs ModelPruning-style masks, through a real Trainer.

Each method trains in its own process (in its main thread, as users train), and the processes take turns of a few
consecutive steps (:class:`Turns`): only one runs at a time, and one cycle of turns, every method's turn once, lasts
seconds. This shared machine's speed drifts by tens of percent over minutes; interleaving by turns cancels the drift
that interleaving whole fits (this script's earlier design) left in every ratio. The first turn of every fit and the
first step of every turn (which finds the caches holding another process's data) are not timed. A step is timed from
the first callback's ``on_train_batch_start`` to the last callback's ``on_train_batch_end``: forward, backward, the
SCL normalization/regularizer/mask update (in ``on_before_optimizer_step``), the optimizer step, and the restore of
protected weights (SCL's ``on_train_batch_end``), i.e. everything SCL adds. Logging is on (``log_every_n_steps=50``)
so the metric logging the SCL callback does is counted too.

"scl" trains the masks at every timed step (never frozen) with ``target_density``, as the recipes do, so the density
controller counts the kept connections at every step; "scl_frozen" freezes them at the first step, which is what the
default ``freeze_masks_at=0.7`` does for the last 30% of a run. Two bracketing callbacks also time SCL's own hooks
(the mask update and the protected-weight restore). The summary line weights the two medians 0.7 / 0.3: the cost of
a default run (derived, not timed as such).

"modelpruning" installs ``torch.nn.utils.prune`` global L1 masks (the forward-pre-hooks Lightning's ModelPruning
uses) before the fit, so every timed step pays their steady-state cost.

Besides the pooled medians, every cycle of turns gives its own ratio to dense (median and min-max over cycles).

Every timed step also records the process's minor page faults and system CPU time: glibc's ``malloc`` may return
freed memory to the system and fault it back in at every step, depending on the order and sizes of allocations
(see :mod:`lightning_scl.memory`). ``--allocator`` chooses who keeps freed memory: ``default`` runs every method as
users run it (SCL's callback retains freed memory on CPU, dense and ModelPruning leave glibc as it is), ``retain``
makes every process retain it, ``glibc`` none.

Usage::

    python benchmarks/step_time.py                 # LeNet-5 (MNIST shape) and ResNet-20 (CIFAR shape), batch 128
    python benchmarks/step_time.py --allocator glibc   # every method with glibc's malloc as it is
    python benchmarks/step_time.py --smoke         # CI: 2 turns of 3 steps per method, writes nothing
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as L
import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from lightning_scl.callbacks.scl import SparseConnectivityLearning
from lightning_scl.memory import retain_freed_memory
from lightning_scl.models import ImageClassifier

RESULTS = Path(__file__).parent / "results"
SHAPES = {"lenet300": (1, 28, 28), "lenet5": (1, 28, 28), "resnet20": (3, 32, 32)}
# (turns per fit, steps per turn): turns of about half a second or more; short fits, since fresh processes (repeats)
# are what averages out a process's own speed
METHODS = ("dense", "scl", "scl_frozen", "modelpruning")
ALLOCATORS = {
    "default": "as users run them (SCL's callback retains freed memory, the others leave glibc's malloc as it is)",
    "retain": "every process retains freed memory (lightning_scl.memory.retain_freed_memory)",
    "glibc": "glibc's malloc as it is for every method (SCL with retain_freed_memory=False)",
}
TURNS = {"lenet300": (11, 10), "lenet5": (11, 10), "resnet20": (6, 4)}


class HookBracket(L.Callback):
    """Placed right before and right after the SCL callback: times what SCL's own per-step hooks take.

    Lightning calls every callback's hook in list order, so the time between the opening and the closing bracket's
    ``on_before_optimizer_step`` (the mask update) and ``on_train_batch_end`` (restoring protected weights) is SCL's.
    The closing bracket keeps one time per step. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each reading,
    so on an accelerator the queued work is counted where it was issued.
    """

    def __init__(self, closing: HookBracket | None = None, sync: Callable[[], None] | None = None):
        self.closing, self.start, self.times, self._step, self.sync = closing, 0.0, [], 0.0, sync

    def _open_or_close(self) -> None:
        if self.sync is not None:
            self.sync()
        if self.closing is not None:  # the opening bracket
            self.closing.start = time.perf_counter()
        else:
            self._step += time.perf_counter() - self.start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = 0.0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._open_or_close()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._open_or_close()
        if self.closing is None:
            self.times.append(self._step)


class Turns:
    """Fits of several methods, each in its own process, take turns of a few consecutive training steps.

    Only the process whose turn it is runs; the others wait, idle. A turn's steps and the other methods' turns of the
    same cycle run within seconds of each other, so the drift of this shared machine's speed (tens of percent over
    minutes) hits every method alike. Each method trains in its process's main thread, as users train, with its own
    memory allocator state. The first step of a turn follows another process's steps (cold caches) and is not timed.
    """

    def __init__(self, context, parties: int):
        self.parties = parties
        self.turn = context.Value("i", 0)
        self.failed = context.Value("b", 0)
        self.cond = context.Condition()
        self.start, self.end = context.Barrier(parties), context.Barrier(parties)

    def wait(self, index: int) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.turn.value == index or self.failed.value, timeout=1800):
                raise TimeoutError("no turn for 30 minutes")
            if self.failed.value:
                raise RuntimeError("another method's fit failed")

    def pass_on(self, index: int) -> None:
        with self.cond:
            self.turn.value = (index + 1) % self.parties
            self.cond.notify_all()

    def fail(self) -> None:
        with self.cond:
            self.failed.value = 1
            self.cond.notify_all()
        self.start.abort()
        self.end.abort()


class StepClock(L.Callback):
    """First callback of a fit: waits for the fit's turns and starts each step's clock (see :class:`Turns`).

    Keeps ``(turn, step, seconds)`` for every timed step: all but the first step of every turn, from the second turn
    on; and, for the same steps, the process's minor page faults and system CPU seconds (``faults``).
    """

    def __init__(self, turns: Turns, index: int, turn_steps: int, total_turns: int):
        self.turns, self.index, self.turn_steps, self.total_turns = turns, index, turn_steps, total_turns
        self.timed: list[tuple[int, int, float]] = []  # (turn, step, seconds)
        self.faults: list[tuple[int, float]] = []  # (minor page faults, system seconds) of the same steps
        self.step, self._start, self._usage = 0, 0.0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.step == 0:  # every fit is set up before anyone's first step
            self.turns.start.wait()
            self.turns.wait(self.index)
        self._usage = resource.getrusage(resource.RUSAGE_SELF)
        self._start = time.perf_counter()

    def stop(self) -> None:
        elapsed = time.perf_counter() - self._start
        usage = resource.getrusage(resource.RUSAGE_SELF)
        turn, position = divmod(self.step, self.turn_steps)
        if turn > 0 and position > 0:
            self.timed.append((turn, self.step, elapsed))
            self.faults.append((usage.ru_minflt - self._usage.ru_minflt, usage.ru_stime - self._usage.ru_stime))
        self.step += 1
        if position == self.turn_steps - 1:
            self.turns.pass_on(self.index)
            if turn == self.total_turns - 1:  # no teardown while another method's steps are timed
                self.turns.end.wait()
            else:  # wait here, so Lightning's bookkeeping and the next batch's loading also run in this fit's turn
                self.turns.wait(self.index)


class StepClockStop(L.Callback):
    """Last callback of a fit: stops the clock once every other callback's ``on_train_batch_end`` has run."""

    def __init__(self, clock: StepClock):
        self.clock = clock

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clock.stop()


def install_method(
    model: nn.Module, method: str, retain_freed_memory: bool = True
) -> SparseConnectivityLearning | None:
    """Set ``model`` up for one of :data:`METHODS`; returns the SCL callback to train with (None for the others).

    With target_density, as the recipes use it: the density controller counts the kept connections every step.
    ``retain_freed_memory`` is the SCL callback's argument of that name.
    """
    if method == "scl":
        # Never frozen: every timed step pays the full mask update (after the default freeze at 70% a step is cheaper).
        return SparseConnectivityLearning(
            target_density=0.02, freeze_masks_at=None, retain_freed_memory=retain_freed_memory
        )
    if method == "scl_frozen":
        # Frozen at the first step (within the untimed warm-up): the cost of the default's last 30% of steps.
        # (A fixed lam: target_density refuses to freeze before its density schedule ends, and frozen masks run
        # no controller anyway.)
        return SparseConnectivityLearning(lam=0.1, freeze_masks_at=0.01, retain_freed_memory=retain_freed_memory)
    if method == "modelpruning":
        layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=0.5)
    elif method != "dense":
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return None


def one_fit(
    model_name: str,
    method: str,
    batch_size: int,
    turns: Turns,
    index: int,
    turn_steps: int,
    total_turns: int,
    allocator: str = "default",
) -> tuple[list[tuple[int, float]], list[float], list[tuple[int, float]]]:
    """``(turn, seconds)`` per timed step, SCL's hook seconds for the same steps (empty without SCL), and the steps'
    ``(minor page faults, system seconds)``."""
    torch.manual_seed(0)
    shape = SHAPES[model_name]
    steps = turn_steps * total_turns
    data = TensorDataset(torch.randn(batch_size * steps, *shape), torch.randint(0, 10, (batch_size * steps,)))
    model = ImageClassifier(model_name, lr=0.05, weight_decay=5e-4)
    clock = StepClock(turns, index, turn_steps, total_turns)
    closing = HookBracket()
    scl = install_method(model, method, retain_freed_memory=allocator != "glibc")
    method_callbacks: list[L.Callback] = [HookBracket(closing), scl, closing] if scl is not None else []
    # A real logger, as in use (logging is part of the step's cost); its files are thrown away.
    with tempfile.TemporaryDirectory() as log_dir:
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=steps,
            callbacks=[clock, *method_callbacks, StepClockStop(clock)],
            logger=L.loggers.CSVLogger(log_dir, name="scl_step_time"),
            log_every_n_steps=50,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, DataLoader(data, batch_size=batch_size))
    hooks = [closing.times[step] for _, step, _ in clock.timed] if closing.times else []
    return [(turn, seconds) for turn, _, seconds in clock.timed], hooks, clock.faults


def _fit_process(
    model_name, method, batch_size, turns, index, turn_steps, total_turns, threads, allocator, results
) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    try:
        if allocator == "retain" and not retain_freed_memory():
            raise RuntimeError("--allocator retain needs glibc's malloc (Linux); this C library is another")
        fit = one_fit(model_name, method, batch_size, turns, index, turn_steps, total_turns, allocator)
        results.put((method, fit))
    except BaseException as error:  # the other processes must not wait for this one forever
        turns.fail()
        results.put((method, f"{type(error).__name__}: {error}"))


def interleaved_fits(
    model_name: str,
    methods: list[str],
    batch_size: int,
    turn_steps: int,
    total_turns: int,
    threads: int,
    allocator: str = "default",
) -> dict[str, tuple[list[tuple[int, float]], list[float], list[tuple[int, float]]]]:
    """Every method's fit in its own process, taking turns (see :class:`Turns`); their timings by method."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no OpenMP state inherited through fork
    turns = Turns(context, len(methods))
    queue = context.Queue()
    processes = [
        context.Process(
            target=_fit_process,
            args=(model_name, method, batch_size, turns, i, turn_steps, total_turns, threads, allocator, queue),
            name=method,
        )
        for i, method in enumerate(methods)
    ]
    for process in processes:
        process.start()
    results = dict(queue.get(timeout=3600) for _ in processes)
    for process in processes:
        process.join()
    failures = {m: r for m, r in results.items() if isinstance(r, str)}
    if failures:
        raise RuntimeError(f"step_time fits failed: {failures}")
    return results


def bootstrap_intervals(cycle_steps: dict[str, list[list[list[float]]]], rounds: int = 1000) -> dict[str, list[float]]:
    """95% intervals of each method's ratio of median step times to dense, and of the default run's (0.7 / 0.3).

    ``cycle_steps[method][repeat][cycle]`` holds a cycle's timed steps. Resamples whole repeats, each a fresh set of
    processes: a process's own speed (its memory placement, its neighbours in the rotation) differs from the next
    one's by several percent, and only new processes sample that.
    """
    rng = random.Random(0)
    count = len(cycle_steps["dense"])
    samples: dict[str, list[float]] = {method: [] for method in [*cycle_steps, "default_run"]}

    def pooled(method: str, pick: list[int]) -> float:
        return statistics.median([t for r in pick for cycle in cycle_steps[method][r] for t in cycle])

    for _ in range(rounds):
        pick = [rng.randrange(count) for _ in range(count)]
        base = pooled("dense", pick)
        for method in cycle_steps:
            samples[method].append(pooled(method, pick) / base)
        samples["default_run"].append(0.7 * samples["scl"][-1] + 0.3 * samples["scl_frozen"][-1])
    return {
        method: [sorted(values)[int(0.025 * rounds)], sorted(values)[int(0.975 * rounds) - 1]]
        for method, values in samples.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet5", "resnet20"], choices=sorted(SHAPES))
    parser.add_argument("--repeats", type=int, default=6, help="fresh sets of interleaved fits per model")
    parser.add_argument("--turns", type=int, default=None, help="turns per fit, the first untimed (default: by model)")
    parser.add_argument("--turn-steps", type=int, default=None, help="steps per turn (default: by model)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--allocator",
        choices=sorted(ALLOCATORS),
        default="default",
        help="default: as users run them (SCL's callback retains freed memory on CPU, the others leave glibc as it "
        "is); retain: every method's process retains freed memory; glibc: none does",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "step_time.json")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.turns, args.turn_steps, args.batch_size = 1, 2, 3, 16
    warnings.filterwarnings("ignore")
    methods = list(METHODS)
    results = {}
    plan = {name: (args.turns or TURNS[name][0], args.turn_steps or TURNS[name][1]) for name in args.models}
    for model_name in args.models:
        total_turns, turn_steps = plan[model_name]
        hooks: dict[str, list[float]] = {m: [] for m in methods}
        faults: dict[str, list[tuple[int, float]]] = {m: [] for m in methods}
        cycle_steps: dict[str, list[list[list[float]]]] = {m: [] for m in methods}  # [repeat][cycle] -> step times
        for repeat in range(args.repeats):
            # the six cyclic orders of the four methods in turn: each method follows each other one equally often
            order = [methods[0], *list(itertools.permutations(methods[1:]))[repeat % 6]]
            fits = interleaved_fits(
                model_name, order, args.batch_size, turn_steps, total_turns, args.threads, args.allocator
            )
            by_turn = {
                method: {turn: [t for c, t in timed if c == turn] for turn in range(1, total_turns)}
                for method, (timed, _, _) in fits.items()
            }
            for method, (_, hook_times, step_faults) in fits.items():
                hooks[method] += hook_times
                faults[method] += step_faults
                cycle_steps[method].append([by_turn[method][turn] for turn in range(1, total_turns)])
        every_cycle = {m: [cycle for repeat in cycle_steps[m] for cycle in repeat] for m in methods}
        times = {m: [t for cycle in every_cycle[m] for t in cycle] for m in methods}
        cycles = {
            m: [
                statistics.median(mine) / statistics.median(base)
                for mine, base in zip(every_cycle[m], every_cycle["dense"])
            ]
            for m in methods
        }
        dense = statistics.median(times["dense"])
        intervals = bootstrap_intervals(cycle_steps)
        results[model_name] = {
            method: {
                "median_ms": 1000 * statistics.median(t),
                "p10_ms": 1000 * statistics.quantiles(t, n=10, method="inclusive")[0],
                "p90_ms": 1000 * statistics.quantiles(t, n=10, method="inclusive")[-1],
                "steps": len(t),
                "ratio_to_dense": statistics.median(t) / dense,
                "ratio_to_dense_95ci": intervals[method],
                # SCL's own hooks (mask update, protected-weight restore): the part of a step SCL adds directly
                "scl_hooks_median_ms": 1000 * statistics.median(hooks[method]) if hooks[method] else None,
                # Each cycle of turns gives its own ratio to dense, free of the machine's drift between cycles; the
                # spread of these ratios is what says whether a ratio is established.
                "cycle_ratios": cycles[method],
                # glibc's malloc may unmap freed memory and fault it back in at every step: system time, not compute
                "page_faults_per_step_median": statistics.median(f for f, _ in faults[method]),
                "system_ms_per_step_median": 1000 * statistics.median(s for _, s in faults[method]),
            }
            for method, t in times.items()
        }
        results[model_name]["default_run_ratio_95ci"] = intervals["default_run"]
    meta = {
        "batch_size": args.batch_size,
        "threads": args.threads,
        "allocator": args.allocator,
        "repeats": args.repeats,
        "turns_and_steps_per_turn": plan,
        "interleaving": "turns of consecutive steps, one process per method, first step of a turn untimed",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
    }
    lines = [
        "| model | method | median ms/step | p10-p90 ms | steps | x dense (95% interval) "
        "| x dense per cycle: median (min-max) | SCL's hooks, median ms/step | page faults/step | system ms/step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model_name, per_method in results.items():
        for method, r in [(m, per_method[m]) for m in methods]:
            ratios = r["cycle_ratios"]
            low, high = r["ratio_to_dense_95ci"]
            lines.append(
                f"| {model_name} | {method} | {r['median_ms']:.1f} | {r['p10_ms']:.1f}-{r['p90_ms']:.1f} | "
                f"{r['steps']} | {r['ratio_to_dense']:.3f} ({low:.3f}-{high:.3f}) | "
                f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) | "
                f"{'-' if r['scl_hooks_median_ms'] is None else format(r['scl_hooks_median_ms'], '.2f')} | "
                f"{r['page_faults_per_step_median']:.0f} | {r['system_ms_per_step_median']:.2f} |"
            )
    for model_name, per_method in results.items():
        run_average = 0.7 * per_method["scl"]["ratio_to_dense"] + 0.3 * per_method["scl_frozen"]["ratio_to_dense"]
        per_cycle = [
            0.7 * trained + 0.3 * frozen
            for trained, frozen in zip(per_method["scl"]["cycle_ratios"], per_method["scl_frozen"]["cycle_ratios"])
        ]
        results[model_name]["default_run_ratio_to_dense"] = run_average
        results[model_name]["default_run_cycle_ratios"] = per_cycle
        within = sum(r <= 1.10 for r in per_cycle)
        lines.append(
            f"\n{model_name}: a default SCL run (masks trained for 70% of the steps, frozen after) costs "
            f"{run_average:.3f}x dense per step on average (0.7 x scl + 0.3 x scl_frozen; 95% interval "
            f"{per_method['default_run_ratio_95ci'][0]:.3f}-{per_method['default_run_ratio_95ci'][1]:.3f}x); per cycle "
            f"{min(per_cycle):.3f}-{max(per_cycle):.3f}x (median {statistics.median(per_cycle):.3f}x), at most 1.10x "
            f"in {within} of {len(per_cycle)} cycles."
        )
    print("\n".join(lines))
    if not args.smoke:
        plan_text = ", ".join(f"{name} {turns} turns of {steps} steps" for name, (turns, steps) in plan.items())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        args.out.with_suffix(".md").write_text(
            f"Batch {args.batch_size}, {args.threads} threads, allocator: {ALLOCATORS[args.allocator]}, each method in "
            "its own process, taking turns: "
            f"{args.repeats} repeats x {plan_text} (the first turn and the first step of every turn untimed), "
            f"torch {torch.__version__}.\n\n" + "\n".join(lines) + "\n"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
