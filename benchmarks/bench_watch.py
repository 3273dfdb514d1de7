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
the variants, and the table gives the median block time per step and its ratio to the unwatched
loop (targets: ≤ 1.05× at every=10, ≤ 1.01× at every=100). Times are the process's CPU time
(``time.process_time``: on a shared machine, far steadier than the wall clock, which is shown
beside it); with one torch thread the two agree on an idle machine. The extra time of a recorded step
is the every=1 figure minus the unwatched one; the every=10 and every=100 overheads are also
predicted from it (the record cost ÷ N), which is steadier than measuring a 1% difference.

It prints a plain table and writes ``benchmarks/results/watch.md``.
"""

from __future__ import annotations

import argparse
import copy
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
HEADER = ("loop", "variant", "CPU ms/step", "ratio", "overhead", "predicted", "wall ms/step", "wall ratio", "setup")


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
    """One variant: its own copy of the model, its optimizer, its watch (None: unwatched)."""

    def __init__(self, model: nn.Module, every: int | None, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.model = copy.deepcopy(model)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.watch = None if every is None else resify.watch(self.model, every=every)
        self.batches = batches
        self.i = 0

    def block(self, steps: int) -> tuple[float, float]:
        """(wall, CPU) seconds for ``steps`` training steps."""
        t, c = time.perf_counter(), time.process_time()
        for _ in range(steps):
            x, y = self.batches[self.i % len(self.batches)]
            self.i += 1
            loss = F.cross_entropy(self.model(x), y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        return time.perf_counter() - t, time.process_time() - c


def measure(model: nn.Module, batches: list, reps: int, steps: int) -> dict[int | None, tuple[float, float]]:
    """Median (wall, CPU) seconds per step for each variant (None: no watch), blocks alternating, after one
    warm-up each."""
    runs = {every: _Run(model, every, batches) for every in (None, *EVERY)}
    for run in runs.values():
        run.block(steps)
    times: dict[int | None, list[tuple[float, float]]] = {every: [] for every in runs}
    for rep in range(reps):
        order = list(runs)
        order = order[rep % len(order) :] + order[: rep % len(order)]  # rotate who goes first
        for every in order:
            wall, cpu = runs[every].block(steps)
            times[every].append((wall / steps, cpu / steps))
    for run in runs.values():
        if run.watch is not None:
            run.watch.close()
            assert run.watch.history.records, "the watch recorded nothing"
    return {
        every: (statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts)) for every, ts in times.items()
    }


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
    rows = []
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    for name in args.loops:
        build, setup = LOOPS[name]
        torch.manual_seed(0)
        model, to_input = build(data)
        x = to_input(data.x_train)
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(x), generator=g)
        batches = [(x[idx], data.y_train[idx]) for idx in perm.split(64) if len(idx) == 64]
        medians = measure(model, batches, args.reps, args.steps)
        (wbase, base) = medians[None]
        record = medians[1][1] - base  # the extra CPU time of one recorded step
        rows.append((name, "no watch", f"{base * 1e3:.2f}", "1.000×", "-", "-", f"{wbase * 1e3:.2f}", "1.000×", setup))
        for every in EVERY:
            wall, t = medians[every]
            predicted = "-" if every == 1 else f"{record / every / base:+.1%}"
            rows.append(
                (
                    name,
                    f"every={every}",
                    f"{t * 1e3:.2f}",
                    f"{t / base:.3f}×",
                    f"{t / base - 1:+.1%}",
                    predicted,
                    f"{wall * 1e3:.2f}",
                    f"{wall / wbase:.3f}×",
                    "",
                )
            )
        rows.append((name, "one record", f"{record * 1e3:.2f}", f"{record / base:.2f} steps", "", "", "", "", ""))
        print(table(HEADER, rows[-len(EVERY) - 2 :]), flush=True)
    seconds = time.perf_counter() - started
    load = f"load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    print(f"{seconds:.0f} s; {load}")
    if args.no_write:
        return 0
    command = "python -m benchmarks.bench_watch" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    md = [
        "# Cost of resify.watch: training-step time with and without it",
        "",
        f"Command: `{command}` ({seconds:.0f} s)  ",
        f"Machine: {what}; {load}"
        + (
            " (other processes shared the cores: the measured overheads are noisy)"
            if max(load_before, os.getloadavg()[0]) > 1.5
            else ""
        ),
        "",
        "Each variant trains its own copy of the model with its watch open throughout, in blocks of "
        f"{args.steps} training steps (forward, cross-entropy, zero_grad, backward, Adam step) that alternate "
        f"between the variants (the first of each after one warm-up block); {args.reps} repetitions, medians of "
        "the block time per step. *overhead* = ratio − 1, measured (targets: ≤ 5% at every=10, ≤ 1% at "
        "every=100); *predicted* = the extra time of one recorded step (every=1 − no watch, the *one record* row) "
        "÷ N ÷ the unwatched step, a steadier estimate of the same thing where the measured difference is within "
        "the noise.",
        "",
        table(HEADER, rows, True),
        "",
    ]
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        f.write("\n".join(md))
    print(f"wrote {os.path.relpath(args.results, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
