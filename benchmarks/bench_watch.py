"""What resify.watch costs a training step: the digits MLP and CNN loops at every=1, 10 and 100.

Run from the repository root::

    python -m benchmarks.bench_watch                   # both loops, 7 repetitions, 1 thread (about 3 min)
    python -m benchmarks.bench_watch mlp --reps 3 --no-write

The loops are those of ``benchmarks/efficacy_digits.py`` on scikit-learn's digits (batch 64, Adam
1e-3, cross-entropy): the 100-layer GELU MLP after ``resify.apply(..., gate='rezero')`` (199
records a step: 100 layers and 99 gates) and the 21-conv VGG-style CNN with BatchNorm after
``resify.apply``. Each variant (no watch; ``resify.watch(model, every=N)`` for N = 1, 10, 100)
trains its own copy of the model, with its watch open throughout, in blocks of ``--steps``
training steps (forward, loss, zero_grad, backward, optimizer step); the blocks alternate between
the variants. Times are the process's CPU time (``time.process_time``: on a shared machine
steadier than the wall clock, which is shown beside it; with one torch thread the two agree on an
idle machine).

Two estimates of the overhead at every=N:

- *measured*: the median block time per step ÷ the unwatched one, minus 1 (targets: ≤ 5% at
  every=10, ≤ 1% at every=100). A difference of a few tenths of a percent is within the noise.
- *predicted*: (the cost of a step between records + the cost of one recorded step ÷ N) ÷ the
  unwatched step. A recorded step's cost is the median recorded step minus the median unrecorded
  one of the same run (interleaved, so the machine's noise is common to both); the cost between
  records (two module hooks and one tensor hook a step, whatever the model) is measured on a
  one-layer model, where it is all the difference.

Before each timed block a full garbage collection runs (untimed), so that a collection one
variant's objects called for does not land in another's block; the pauses within each variant's
blocks are added up. It prints plain tables and writes ``benchmarks/results/watch.md``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import resify
from benchmarks import efficacy_digits as digits
from benchmarks.common import machine, table

__all__ = ["LOOPS", "EVERY", "measure", "main"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVERY = (1, 10, 100)
HEADER = ("loop", "variant", "CPU ms/step", "ratio", "overhead", "wall ms/step", "wall ratio", "GC pauses s", "setup")
COST_HEADER = ("loop", "one record", "between records", "predicted every=10", "predicted every=100")


def _mlp(data: digits.Digits) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    return digits.build("resify+rezero", 100, "gelu", seed=0, example=data.x_train[:2]), lambda x: x


def _cnn(data: digits.Digits) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    return digits.build_cnn("resify", seed=0, norm=True, example=data.x_train[:2]), digits._image


#: name -> (model and input transform from the data, description)
LOOPS: dict[str, tuple[Callable, str]] = {
    "mlp": (_mlp, "100-layer GELU MLP (width 64), resify.apply(gate='rezero'), batch 64, Adam"),
    "cnn": (_cnn, "21-conv VGG-style CNN with BatchNorm, resify.apply, 1×8×8, batch 64, Adam"),
}


class _Run:
    """One variant: its own copy of the model, its optimizer, its watch (None: unwatched), its times."""

    def __init__(self, model: nn.Module, every: int | None, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.model = copy.deepcopy(model)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.watch = None if every is None else resify.watch(self.model, every=every)
        self.batches = batches
        self.i = 0
        self.blocks: list[tuple[float, float]] = []  # (wall, CPU) seconds per step of each timed block
        self.steps: list[tuple[bool, float]] = []  # (recorded, CPU seconds) of each timed step
        self.gc_seconds = 0.0  # the garbage collector's pauses during this variant's timed blocks

    def block(self, steps: int, keep: bool = True) -> None:
        t, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            x, y = self.batches[self.i % len(self.batches)]
            self.i += 1
            w = self.watch
            recorded = w is not None and w.steps_seen % w.every == 0
            s = time.process_time()
            loss = F.cross_entropy(self.model(x), y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            if keep:
                self.steps.append((recorded, time.process_time() - s))
        if keep:
            self.blocks.append(((time.perf_counter() - t) / steps, (time.process_time() - c) / steps))

    def median(self, recorded: bool) -> float:
        return statistics.median(t for r, t in self.steps if r == recorded)


class _GCClock:
    """Adds the garbage collector's pauses to the run being timed (a ``gc.callbacks`` entry)."""

    def __init__(self) -> None:
        self.run: _Run | None = None
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.process_time()
        elif self.run is not None:
            self.run.gc_seconds += time.process_time() - self._start


def measure(model: nn.Module, batches: list, reps: int, steps: int) -> dict[int | None, _Run]:
    """Every variant (None: no watch) after one warm-up block, then ``reps`` blocks of each, alternating."""
    runs = {every: _Run(model, every, batches) for every in (None, *EVERY)}
    for run in runs.values():
        run.block(steps, keep=False)
    clock = _GCClock()
    gc.callbacks.append(clock)
    try:
        for rep in range(reps):
            order = list(runs)
            order = order[rep % len(order) :] + order[: rep % len(order)]  # rotate who goes first
            for every in order:
                clock.run = None
                gc.collect()  # (untimed) a full collection that another variant's objects called for lands here
                clock.run = runs[every]
                runs[every].block(steps)
    finally:
        gc.callbacks.remove(clock)
    for run in runs.values():
        if run.watch is not None:
            run.watch.close()
            assert run.watch.history.records, "the watch recorded nothing"
    return runs


def hook_cost(reps: int = 15, steps: int = 300) -> float:
    """CPU seconds a watch adds to a step between records: measured on a one-layer model, where the
    hooks are all the difference (alternating blocks, medians)."""
    torch.manual_seed(0)
    plain = nn.Linear(8, 8)
    watched = copy.deepcopy(plain)
    x = torch.randn(4, 8)
    w = resify.watch(watched, every=10**9)
    watched(x).sum().backward()  # step 0, the one record; none after it
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(reps):
        for on, m in ((False, plain), (True, watched)):
            c = time.process_time()
            for _ in range(steps):
                m(x).sum().backward()
            times[on].append((time.process_time() - c) / steps)
    w.close()
    return statistics.median(times[True]) - statistics.median(times[False])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("loops", nargs="*", help=f"some of {', '.join(LOOPS)} (default: all)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100, help="training steps per timed block (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steady on a shared machine)")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "watch.md"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    unknown = [m for m in args.loops if m not in LOOPS]
    if unknown:
        parser.error(f"unknown loop(s) {', '.join(unknown)}; expected some of {', '.join(LOOPS)}")
    args.loops = args.loops or list(LOOPS)
    torch.set_num_threads(args.threads)
    data = digits.load_data()
    what = machine()
    print(f"{what}; {args.reps} repetitions of {args.steps}-step blocks, medians")
    rows, costs = [], []
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    between = hook_cost()
    print(f"between records: {between * 1e6:.1f} µs a step (the watch's hooks on a one-layer model)")
    for name in args.loops:
        build, setup = LOOPS[name]
        torch.manual_seed(0)
        model, to_input = build(data)
        x = to_input(data.x_train)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        batches = [(x[idx], data.y_train[idx]) for idx in perm.split(64) if len(idx) == 64]
        runs = measure(model, batches, args.reps, args.steps)
        wbase = statistics.median(w for w, _ in runs[None].blocks)
        base = statistics.median(c for _, c in runs[None].blocks)
        for every, run in runs.items():
            wall = statistics.median(w for w, _ in run.blocks)
            cpu = statistics.median(c for _, c in run.blocks)
            label = "no watch" if every is None else f"every={every}"
            rows.append(
                (
                    name,
                    label,
                    f"{cpu * 1e3:.2f}",
                    f"{cpu / base:.3f}×",
                    "-" if every is None else f"{cpu / base - 1:+.1%}",
                    f"{wall * 1e3:.2f}",
                    f"{wall / wbase:.3f}×",
                    f"{run.gc_seconds:.2f}",
                    setup if every is None else "",
                )
            )
        unwatched = runs[None].median(False)
        record = runs[10].median(True) - runs[10].median(False)
        costs.append(
            (
                name,
                f"{record * 1e3:.2f} ms ({record / unwatched:.2f} steps)",
                f"{between * 1e6:+.0f} µs ({between / unwatched:+.1%})",
                f"{(between + record / 10) / unwatched:+.1%}",
                f"{(between + record / 100) / unwatched:+.1%}",
            )
        )
        print(table(HEADER, rows[-len(runs) :]), flush=True)
        print(table(COST_HEADER, costs[-1:]), flush=True)
    seconds = time.perf_counter() - started
    load = f"load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    print(f"{seconds:.0f} s; {load}")
    if args.no_write:
        return 0
    command = "python -m benchmarks.bench_watch" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    shared = max(load_before, os.getloadavg()[0]) > 1.5
    md = [
        "# Cost of resify.watch: training-step time with and without it",
        "",
        f"Command: `{command}` ({seconds:.0f} s)  ",
        f"Machine: {what}; {load}"
        + (" (other processes shared the two cores: the measured overheads are noisy)" if shared else ""),
        "",
        "Each variant trains its own copy of the model with its watch open throughout, in blocks of "
        f"{args.steps} training steps (forward, cross-entropy, zero_grad, backward, Adam step) that alternate "
        f"between the variants, after one warm-up block each; {args.reps} repetitions. *CPU ms/step*: the median "
        "block's CPU time per step; *overhead*: its ratio to the unwatched loop − 1 (targets: ≤ 5% at every=10, "
        "≤ 1% at every=100); *GC pauses*: the garbage collector's pauses during the variant's blocks (a full "
        "collection runs, untimed, before each block).",
        "",
        table(HEADER, rows, True),
        "",
        "From per-step times: *one record* = the median recorded step − the median unrecorded step of the "
        "every=10 run (interleaved, so the noise is common to both); *between records* = what the watch's hooks "
        "add to a step between records, measured on a one-layer model (alternating 300-step blocks, 15 "
        "repetitions, medians), where they are all the difference; *predicted* = (between + one record ÷ N) ÷ "
        "the unwatched step.",
        "",
        table(COST_HEADER, costs, True),
        "",
    ]
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        f.write("\n".join(md))
    print(f"wrote {os.path.relpath(args.results, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
