"""Runtime cost of a converted model: ``resify.apply(plain)`` against the same network written by hand.

For a deep MLP and a VGG-style CNN it builds the plain network, converts it with
``resify.apply(plain, x, gate=None)``, and builds the hand-written residual equivalent (the seed
guide's ``ImprovedResidualNetwork`` pattern, ``use_shortcut=True``) with the converted model's
weights, checks that both compute the same outputs, then times one training step (forward, a
cross-entropy loss, backward) of each, alternating A B B A … in one process, after warm-up;
medians and their ratio. It does so in eager mode and under ``torch.compile``.

Peak memory of a step: on CPU, the peak of the bytes held by torch's CPU allocator during the
step, above what was held when it began (the running sum of the allocation and free events that
``torch.profiler`` records with ``profile_memory=True``); it counts activations, autograd's saved
tensors, temporaries and the new gradients, not the weights. Process RSS is not used: the C
allocator keeps freed pages, so it would not show the step's peak. As a cross-check in eager mode,
the bytes of the distinct tensors autograd saves for backward (``saved_tensors_hooks``). On CUDA
(``--device cuda``): ``torch.cuda.max_memory_allocated`` over the step.

Run from the repository root::

    python -m benchmarks.bench_runtime                  # eager + compile, MLP + CNN (about 5 min on CPU)
    python -m benchmarks.bench_runtime --no-compile --reps 20
    python -m benchmarks.bench_runtime --device cuda    # on a GPU machine

It prints a plain table and writes ``benchmarks/results/runtime.md`` (``runtime-cuda.md`` on CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import resify
from benchmarks.common import SeedMLP, VGGNet, copy_shortcut_weights, machine, table

__all__ = ["Pair", "Measure", "make_mlp_pair", "make_cnn_pair", "time_steps", "peak_bytes", "saved_bytes", "main"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Pair:
    """A converted model and its hand-written twin with the same weights, and an input batch."""

    name: str
    converted: nn.Module
    hand: nn.Module
    x: torch.Tensor
    y: torch.Tensor


@dataclass(frozen=True)
class Measure:
    """Median step seconds and peak bytes of the converted and the hand-written model."""

    name: str
    mode: str
    conv_s: float
    hand_s: float
    paired: float  # median over repetitions of (converted / hand) for adjacent runs
    conv_peak: int
    hand_peak: int
    conv_saved: int | None
    hand_saved: int | None
    reps: int
    compile_s: float | None = None


def _check_same(pair: Pair) -> None:
    """Both models compute the same outputs and gradients on the batch (else the comparison is void)."""
    pair.converted.eval()
    pair.hand.eval()
    with torch.no_grad():
        torch.testing.assert_close(pair.converted(pair.x), pair.hand(pair.x), rtol=1e-4, atol=1e-4)
    pair.converted.train()
    pair.hand.train()


def make_mlp_pair(depth: int, width: int, batch: int, device: str) -> Pair:
    """A plain MLP of ``depth`` Linear(width, width) + GELU layers and a 10-way output layer."""
    torch.manual_seed(0)
    sizes = [width] * depth + [10]
    plain = SeedMLP(sizes, use_shortcut=False, act=nn.GELU).to(device)
    x = torch.randn(batch, width, device=device)
    converted = resify.apply(plain, x, gate=None)  # exactly x + F(x): the hand-written net's sum
    hand = SeedMLP(sizes, use_shortcut=True, act=nn.GELU).to(device)
    copy_shortcut_weights(converted, hand)
    pair = Pair(
        f"MLP {depth}×{width}, batch {batch}", converted, hand, x, torch.randint(0, 10, (batch,), device=device)
    )
    _check_same(pair)
    return pair


def make_cnn_pair(channels: Sequence[int], per_stage: int, side: int, batch: int, device: str) -> Pair:
    """A plain VGG-style CNN (conv3×3 + BatchNorm + ReLU, max-pool between stages) on 3×side×side images."""
    torch.manual_seed(0)
    kw = dict(in_channels=3, classes=10, stages=tuple(channels), per_stage=per_stage, norm=True, input_size=side)
    plain = VGGNet(**kw).to(device)
    x = torch.randn(batch, 3, side, side, device=device)
    converted = resify.apply(plain, x, gate=None)
    hand = VGGNet(**kw, use_shortcut=True).to(device)
    copy_shortcut_weights(converted, hand)
    n = len(channels) * per_stage
    pair = Pair(
        f"VGG CNN {n} conv {'/'.join(map(str, channels))}, {side}×{side}, batch {batch}",
        converted,
        hand,
        x,
        torch.randint(0, 10, (batch,), device=device),
    )
    _check_same(pair)
    return pair


def _step_fn(model: Callable, params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        for p in params:
            p.grad = None
        F.cross_entropy(model(x), y).backward()

    return step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(steps: Sequence[Callable[[], None]], reps: int, warmup: int, device: str) -> list[list[float]]:
    """Seconds per call of each step, in the order A B B A A B … so that drift falls on both alike."""
    for _ in range(warmup):
        for s in steps:
            s()
    _sync(device)
    times: list[list[float]] = [[] for _ in steps]
    for r in range(reps):
        order = range(len(steps)) if r % 2 == 0 else reversed(range(len(steps)))
        for i in order:
            t = time.perf_counter()
            steps[i]()
            _sync(device)
            times[i].append(time.perf_counter() - t)
    return times


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler prints start/stop lines there from C++)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def peak_bytes(step: Callable[[], None], params: Sequence[torch.Tensor], device: str) -> int:
    """Peak bytes held during one ``step`` above those held when it began (see the module docstring).

    The gradients of ``params`` are dropped first, so that freeing the last step's gradients
    does not count against this one's peak.
    """
    for p in params:
        p.grad = None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (eager only)."""
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen |= params  # the weights are saved by reference; they are not the step's memory
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return total


def measure(pair: Pair, mode: str, reps: int, warmup: int, device: str) -> Measure:
    """Time and peak memory of one training step of both models (``mode``: 'eager' or 'compile')."""
    compile_s = None
    conv, hand = pair.converted, pair.hand
    if mode == "compile":
        torch._dynamo.reset()
        t = time.perf_counter()
        conv_c, hand_c = torch.compile(conv), torch.compile(hand)
        for m in (conv_c, hand_c):  # compile forward and backward now, not inside the timed loop
            F.cross_entropy(m(pair.x), pair.y).backward()
        _sync(device)
        compile_s = time.perf_counter() - t
    else:
        conv_c, hand_c = conv, hand
    params = [list(conv.parameters()), list(hand.parameters())]
    steps = [_step_fn(conv_c, params[0], pair.x, pair.y), _step_fn(hand_c, params[1], pair.x, pair.y)]
    times = time_steps(steps, reps, warmup, device)
    paired = statistics.median(a / b for a, b in zip(*times))
    peaks = [statistics.median(peak_bytes(s, ps, device) for _ in range(3)) for s, ps in zip(steps, params)]
    saved = [saved_bytes(conv, pair.x), saved_bytes(hand, pair.x)] if mode == "eager" else [None, None]
    return Measure(
        pair.name,
        mode,
        statistics.median(times[0]),
        statistics.median(times[1]),
        paired,
        int(peaks[0]),
        int(peaks[1]),
        saved[0],
        saved[1],
        reps,
        compile_s,
    )


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.2f}"


def _rows(ms: Sequence[Measure]) -> list[list[object]]:
    rows = []
    for m in ms:
        saved = (
            "-"
            if m.conv_saved is None
            else f"{_mib(m.conv_saved)} / {_mib(m.hand_saved)} = {m.conv_saved / m.hand_saved:.3f}×"
        )
        rows.append(
            [
                m.name,
                m.mode,
                f"{1e3 * m.conv_s:.2f}",
                f"{1e3 * m.hand_s:.2f}",
                f"{m.conv_s / m.hand_s:.3f}×",
                f"{m.paired:.3f}×",
                f"{_mib(m.conv_peak)} / {_mib(m.hand_peak)}",
                f"{m.conv_peak / m.hand_peak:.3f}×",
                saved,
                "-" if m.compile_s is None else f"{m.compile_s:.0f} s",
            ]
        )
    return rows


HEADER = [
    "model",
    "mode",
    "resify ms",
    "hand ms",
    "time ratio",
    "paired ratio",
    "peak MiB (resify / hand)",
    "memory ratio",
    "saved for backward MiB",
    "compile",
]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--mlp", type=int, nargs=3, default=[64, 256, 128], metavar=("DEPTH", "WIDTH", "BATCH"))
    p.add_argument(
        "--cnn",
        type=int,
        nargs=3,
        default=[7, 32, 32],
        metavar=("PER_STAGE", "SIDE", "BATCH"),
        help="conv layers per stage (3 stages of 32/64/128 channels), image side, batch",
    )
    p.add_argument("--results", default=None)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = args.device
    results = args.results or os.path.join(
        ROOT, "benchmarks", "results", "runtime.md" if device == "cpu" else "runtime-cuda.md"
    )
    what = machine() + (f"; device {torch.cuda.get_device_name()}" if device.startswith("cuda") else "")
    print(what)
    pairs = [
        make_mlp_pair(*args.mlp, device),
        make_cnn_pair((32, 64, 128), args.cnn[0], args.cnn[1], args.cnn[2], device),
    ]
    measures: list[Measure] = []
    notes: list[str] = []
    for mode in ("eager",) if args.no_compile else ("eager", "compile"):
        for pair in pairs:
            try:
                m = measure(pair, mode, args.reps, args.warmup, device)
            except Exception as e:  # torch.compile may be unavailable (no compiler): say so, go on
                notes.append(f"{pair.name}, {mode}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                print(notes[-1])
                traceback.print_exc(limit=3)
                continue
            measures.append(m)
            print(table(HEADER, _rows([m])).splitlines()[-1], flush=True)
    print("\n" + table(HEADER, _rows(measures)))
    for n in notes:
        print(n)
    if args.no_write:
        return
    md = [
        "# Runtime cost: resify.apply(plain) vs the hand-written residual network",
        "",
        "Command: `"
        + f"python -m benchmarks.bench_runtime {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip()
        + "`  ",
        f"Machine: {what}",
        "",
        "One training step (forward, cross-entropy, backward; gradients set to None before it) of "
        "each model, same weights, same batch; the two alternate (A B B A …) in one process after "
        f"{args.warmup} warm-up steps; {args.reps} repetitions, medians. *time ratio* = median(resify) / "
        "median(hand); *paired ratio* = median over repetitions of resify / hand in adjacent runs. "
        "Peak memory: "
        + (
            "`torch.cuda.max_memory_allocated` over the step, above the memory held before it."
            if device.startswith("cuda")
            else "the peak, during the step, of the bytes held by torch's CPU allocator above "
            "those held when it began (running sum of the allocation/free events of "
            "`torch.profiler` with `profile_memory=True`; activations, saved tensors, "
            "temporaries and the new gradients; median of 3). *saved for backward*: the "
            "distinct tensors autograd saves in one forward (`saved_tensors_hooks`), eager only."
        ),
        "",
        table(HEADER, _rows(measures), True),
        "",
    ]
    if notes:
        md += ["Failures:", "", *[f"- {n}" for n in notes], ""]
    os.makedirs(os.path.dirname(results), exist_ok=True)
    with open(results, "w") as f:
        f.write("\n".join(md))
    print(f"\nwrote {os.path.relpath(results, ROOT)}")


if __name__ == "__main__":
    main()
