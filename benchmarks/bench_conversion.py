"""Conversion speed: ``resify.apply`` against ``torch.fx.symbolic_trace`` of the same model, as a ratio.

For plain MLPs of 10, 100, 1,000 and 10,000 layers (Linear(64, 64) + ReLU, the seed's pattern)
and for the torchvision classification zoo (``weights=None``, eval mode, one 3×224×224 image;
299×299 for inception_v3), it times, alternately in one process, ``symbolic_trace(model)`` and
``resify.apply(model, x)`` and reports the ratio of their medians. ``apply`` does more than the
trace: it traces the model (a private copy of its module tree) and records every node's shape (by
rules and on meta tensors, without computing), analyses the graph and plans, then installs the plan
in a copy of the user's model (same class; it never changes the user's model, and the weights are
copied on write): it traces each module that owns a shortcut again, creates and initialises the new
projection layers, inserts the shortcuts and generates that module's forward. The tables split its
time into those stages, and ``--profile N`` runs cProfile on the N-layer MLP.

Run from the repository root::

    python -m benchmarks.bench_conversion                   # MLPs + the whole zoo (about 10 min)
    python -m benchmarks.bench_conversion --skip-big        # without the four >250M-parameter models
    python -m benchmarks.bench_conversion --models resnet50 vit_b_16 --depths 10 100
    python -m benchmarks.bench_conversion --no-zoo --profile 10000

It prints plain tables and writes ``benchmarks/results/conversion.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import math
import os
import pstats
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn

import resify
from benchmarks.common import SeedMLP, machine, table
from resify import api
from resify.constants import image_size
from resify.rewriting import rewrite as rewrite_stage
from resify.tracing.trace import trace

__all__ = ["Timing", "time_conversion", "stage_times", "mlp", "zoo_names", "main"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: torchvision models of more than 250M parameters, left out by --skip-big.
BIG = ("vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32")


@dataclass(frozen=True)
class Timing:
    """Median seconds of symbolic_trace and of resify.apply on one model, and what apply made."""

    name: str
    layers: int
    trace_s: float
    apply_s: float
    reps: int
    tracer: str
    shapes_from: str  # "meta" (rules + meta tensors) or "run" (a real forward pass)
    sites: int
    added_params: int
    init_s: float  # creating and initialising the plan's new projection layers (apply − apply with them on meta)

    @property
    def ratio_without_init(self) -> float:
        return (self.apply_s - self.init_s) / self.trace_s

    @property
    def ratio(self) -> float:
        return self.apply_s / self.trace_s


def _clock(fn: Callable[[], object]) -> float:
    gc.collect()  # garbage from the previous call is not this call's cost
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def time_conversion(name: str, model: nn.Module, x: torch.Tensor, reps: int = 3, budget_s: float = 20.0) -> Timing:
    """Median times of symbolic_trace and resify.apply, alternating; fewer reps once ``budget_s`` is spent."""
    traces, applies = [], []
    results: list[nn.Module] = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(reps):
            traces.append(_clock(lambda: torch.fx.symbolic_trace(model)))
            results.clear()
            applies.append(_clock(lambda: results.append(resify.apply(model, x))))
            if time.perf_counter() - start > budget_s:
                break
        shapes_from = trace(model, x).shapes_from
    the_plan = resify.applied_plan(results[0])
    assert the_plan is not None  # resify.apply's result always carries its plan
    results.clear()
    with warnings.catch_warnings(), _projections_on_meta():
        warnings.simplefilter("ignore")
        bare = statistics.median(_clock(lambda: resify.apply(model, x)) for _ in range(len(traces)))
    return Timing(
        name,
        the_plan.n_layers,
        statistics.median(traces),
        statistics.median(applies),
        len(traces),
        the_plan.tracer,
        shapes_from,
        len(the_plan.sites),
        the_plan.added_params,
        max(statistics.median(applies) - bare, 0.0),
    )


@contextlib.contextmanager
def _projections_on_meta() -> Iterator[None]:
    """While active, apply makes its new projection layers on the meta device: no memory, no
    initialisation. Only for timing what the rest of apply costs; the results are not usable."""
    original = rewrite_stage._projection
    rewrite_stage._projection = lambda form, factory: original(form, {**factory, "device": "meta"})
    try:
        yield
    finally:
        rewrite_stage._projection = original


#: The stages of ``resify.apply``, each the functions of ``resify.api`` that carry it out (``_prepare``
#: calls the first three per traced unit; ``install`` traces each owner again, builds and inserts).
STAGES: dict[str, tuple[str, ...]] = {
    "trace": ("trace_units",),
    "analyze": ("analyze",),
    "plan": ("make_plan", "reconcile_modes", "choose_gates", "place", "merge", "check_patterns", "settle"),
    "install": ("install",),
}


@contextlib.contextmanager
def _stage_clocks(out: dict[str, float]) -> Iterator[None]:
    """While active, the calls ``resify.api`` makes to each stage's functions add their seconds to ``out``."""
    saved = {fn: getattr(api, fn) for fns in STAGES.values() for fn in fns if hasattr(api, fn)}

    def clocked(stage: str, fn: Callable) -> Callable:
        def run(*args: object, **kwargs: object) -> object:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                out[stage] += time.perf_counter() - t

        return run

    for stage, fns in STAGES.items():
        out.setdefault(stage, 0.0)
        for fn in fns:
            if fn in saved:  # a stage function this version of resify.api calls
                setattr(api, fn, clocked(stage, saved[fn]))
    try:
        yield
    finally:
        for fn, original in saved.items():
            setattr(api, fn, original)


def stage_times(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Seconds of each stage of one ``resify.apply(model, x)`` (see ``STAGES``): trace (copy, trace,
    shapes), analyze, plan (plan, choose the gates, place each site in its owner, merge, name),
    install (copy the model, trace each owner again, build the new layers, insert the shortcuts,
    generate the forwards)."""
    out: dict[str, float] = {}
    gc.collect()
    with _stage_clocks(out):
        resify.apply(model, x)
    return out


def mlp(depth: int) -> nn.Module:
    """A plain MLP of ``depth`` Linear(64, 64) + ReLU layers (the seed's pattern, no shortcut)."""
    torch.manual_seed(0)
    return SeedMLP([64] * (depth + 1), use_shortcut=False, act=nn.ReLU)


def zoo_names() -> list[str]:
    """The torchvision classification models."""
    import torchvision

    return list(torchvision.models.list_models(torchvision.models))


def _zoo_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    import torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None)
    model.eval()
    return model, torch.randn(1, 3, image_size(name), image_size(name))


def profile_mlp(depth: int, top: int = 30) -> str:
    """cProfile of resify.apply on the ``depth``-layer MLP: the top functions by cumulative time."""
    model, x = mlp(depth), torch.randn(2, 64)
    prof = cProfile.Profile()
    gc.collect()
    prof.enable()
    resify.apply(model, x)
    prof.disable()
    s = io.StringIO()
    stats = pstats.Stats(prof, stream=s)
    stats.sort_stats("cumulative").print_stats(top)
    s.write("\n--- by own time ---\n")
    stats.sort_stats("tottime").print_stats(15)
    return s.getvalue()


def _gc_share(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """resify.apply seconds with the cyclic garbage collector on, then off."""
    on = _clock(lambda: resify.apply(model, x))
    gc.disable()
    try:
        off = _clock(lambda: resify.apply(model, x))
    finally:
        gc.enable()
    return on, off


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[10, 100, 1000, 10000])
    p.add_argument("--models", nargs="+", help="torchvision model names (default: all classification models)")
    p.add_argument("--no-zoo", action="store_true")
    p.add_argument("--skip-big", action="store_true", help=f"leave out {', '.join(BIG)}")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile", type=int, default=10000, metavar="N", help="cProfile the N-layer MLP (0: no profile)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "conversion.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    md = [
        "# Conversion speed: resify.apply vs torch.fx.symbolic_trace",
        "",
        "Command: `" + f"python -m benchmarks.bench_conversion {' '.join(sys.argv[1:])}".rstrip() + "`  ",
        f"Machine: {machine()}",
        "",
        "Times are medians of alternating runs in one process (garbage collected before each). "
        "Ratio = apply / symbolic_trace. Stage times (one run, ms) split `apply`: *trace* = module-tree "
        "copy + tracing + shape recording, *plan* = planning, placing each site in the module that owns it "
        "and naming it, *install* = the copy of the user's model, each owner traced again, the new layers "
        "(with their initialisation), graph surgery and the owners' generated forwards.",
        "",
    ]

    # ---- MLPs
    rows, stage_rows = [], []
    for depth in args.depths:
        model, x = mlp(depth), torch.randn(2, 64)
        reps = args.reps if depth <= 1000 else 1
        t = time_conversion(f"MLP-{depth}", model, x, reps=reps, budget_s=60)
        st = stage_times(model, x)
        total = sum(st.values())
        rows.append(
            [
                depth,
                f"{t.trace_s:.3f}",
                f"{t.apply_s:.3f}",
                f"{t.ratio:.2f}",
                f"{1e6 * t.trace_s / depth:.0f}",
                f"{1e6 * t.apply_s / depth:.0f}",
                t.sites,
            ]
        )
        stage_rows.append([depth, *(f"{st[k]:.3f} ({100 * st[k] / total:.0f}%)" for k in st)])
        print(f"  MLP-{depth}: trace {t.trace_s:.3f} s, apply {t.apply_s:.3f} s, ratio {t.ratio:.2f}", flush=True)
        del model
    head = ["layers", "symbolic_trace s", "resify.apply s", "ratio", "trace µs/layer", "apply µs/layer", "sites"]
    print("\n" + table(head, rows))
    stage_head = [
        "layers",
        "trace (copy+trace+shapes)",
        "analyze",
        "plan",
        "install (copy, owner traces, new layers, codegen)",
    ]
    print("\n" + table(stage_head, stage_rows))
    md += [
        "## Plain MLPs (Linear(64, 64) + ReLU per layer, input [2, 64])",
        "",
        table(head, rows, True),
        "",
        "Where `apply`'s time goes, by stage (one run):",
        "",
        table(stage_head, stage_rows, True),
        "",
    ]

    if args.profile:
        on, off = _gc_share(mlp(args.profile), torch.randn(2, 64))
        prof = profile_mlp(args.profile)
        print(
            f"\nresify.apply on the {args.profile}-layer MLP: {on:.2f} s with the garbage collector, "
            f"{off:.2f} s without\n"
        )
        print(prof)
        md += [
            f"## Profile of the {args.profile:,}-layer MLP",
            "",
            f"`resify.apply`: {on:.2f} s with Python's cyclic garbage collector on, {off:.2f} s with it off "
            f"(the collector's passes over the many new objects are {100 * (on - off) / on:.0f}% of the time).",
            "",
            "cProfile (profiling roughly doubles the times):",
            "",
            "```",
            prof.strip(),
            "```",
            "",
        ]

    # ---- zoo
    if not args.no_zoo:
        names = args.models or zoo_names()
        if args.skip_big:
            names = [n for n in names if n not in BIG]
        zoo: list[Timing] = []
        stages: dict[str, dict[str, float]] = {}
        failed: list[tuple[str, str]] = []
        for name in names:
            try:
                model, x = _zoo_model(name)
                zoo.append(time_conversion(name, model, x, reps=args.reps, budget_s=20))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    stages[name] = stage_times(model, x)
                z = zoo[-1]
                print(
                    f"  {name}: trace {z.trace_s:.3f} s, apply {z.apply_s:.3f} s, ratio {z.ratio:.2f}, "
                    f"{z.sites} sites (+{z.added_params:,} params), {z.tracer}, shapes from {z.shapes_from}",
                    flush=True,
                )
            except Exception as e:  # a model resify cannot convert is a finding, not a crash
                failed.append((name, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
                print(f"  {name}: FAILED {failed[-1][1]}", flush=True)
            finally:
                model = None
                gc.collect()
        zrows = [
            [
                z.name,
                z.layers,
                z.sites,
                f"{z.added_params:,}",
                z.tracer,
                z.shapes_from,
                f"{z.trace_s:.3f}",
                f"{z.apply_s:.3f}",
                f"{z.ratio:.2f}",
                f"{z.ratio_without_init:.2f}",
                *(f"{1e3 * stages[z.name][k]:.0f}" for k in stages[z.name]),
                f"{1e3 * z.init_s:.0f}",
            ]
            for z in zoo
        ]
        zhead = [
            "model",
            "layers",
            "sites",
            "+params",
            "tracer",
            "shapes",
            "trace s",
            "apply s",
            "ratio",
            "ratio w/o init",
            "trace ms",
            "analyze ms",
            "plan ms",
            "install ms",
            "of which init ms",
        ]
        ratios = [z.ratio for z in zoo]
        if zoo:
            worst = max(zoo, key=lambda z: z.ratio)
            no_init = [z.ratio_without_init for z in zoo]
            summary = (
                f"{len(zoo)} models: ratio median {statistics.median(ratios):.2f}, worst "
                f"{worst.ratio:.2f} ({worst.name}, +{worst.added_params:,} new parameters), geometric mean "
                f"{math.exp(statistics.fmean(map(math.log, ratios))):.2f}; shapes from meta tensors for "
                f"{sum(z.shapes_from == 'meta' for z in zoo)} of {len(zoo)}. Without the initialisation "
                f"of the new projection layers (which symbolic_trace has no counterpart for): median "
                f"{statistics.median(no_init):.2f}, worst {max(no_init):.2f} "
                f"({max(zoo, key=lambda z: z.ratio_without_init).name})"
            )
        else:
            summary = "no model converted"
        print("\n" + table(zhead, zrows) + "\n\n" + summary)
        md += [
            "## torchvision classification zoo (weights=None, eval, one image)",
            "",
            summary,
            "",
            "New projection layers are created and initialised like any torch layer (kaiming-uniform "
            "for 100M parameters is about half a second), which symbolic_trace never does: the models "
            "whose plan adds a large projection (VGG's and AlexNet's 25088→4096 classifier) have the "
            "largest ratios. `ratio w/o init` = the ratio when those layers are made on the meta device "
            "(no memory, no initialisation; timed the same way, for this table only), and "
            "`of which init ms` the difference.",
            "",
            table(zhead, zrows, True),
            "",
        ]
        if failed:
            print("\nfailed:\n" + "\n".join(f"  {n}: {e}" for n, e in failed))
            md += ["Failed:", "", *[f"- `{n}`: {e}" for n, e in failed], ""]
        if args.skip_big:
            md += [f"Left out (--skip-big): {', '.join(BIG)}.", ""]
    if not args.no_write:
        os.makedirs(os.path.dirname(args.results), exist_ok=True)
        with open(args.results, "w") as f:
            f.write("\n".join(md))
        print(f"\nwrote {os.path.relpath(args.results, ROOT)}")


if __name__ == "__main__":
    main()
