"""Sweep resify over timm's models: converted and checked, refused with a reason, or failing.

    .venv/bin/python -m benchmarks.timm_sweep                         # every 13th of sorted(timm.list_models())
    .venv/bin/python -m benchmarks.timm_sweep --every 13 --limit 5    # the first five of those
    .venv/bin/python -m benchmarks.timm_sweep resnet18 vit_tiny_patch16_224 --out /tmp/timm.md
    .venv/bin/python -m benchmarks.timm_sweep some_model --in-process --traceback   # debug one model

Each model is built by ``timm.create_model(name, pretrained=False)`` after ``torch.manual_seed(0)``,
in eval mode, and given a random input of its default size (``model.default_cfg['input_size']``)
with batch 2. A model over ``--max-params`` (200M) parameters is skipped by size (counted on the meta
device, so it is never built for real); one that timm cannot build, or that cannot run on that input,
is "original fails" (not a resify result); one whose build takes over ``--build-limit`` seconds is
skipped by time.

The rest are converted twice: ``resify.apply(model, x)`` and ``resify.apply(model, x,
preserve_output=True)``. A ResifyError is a refusal (its message is recorded); any other exception
from resify, or from running a converted model, is a failure. Checks, for both conversions:
the output's shapes equal the original's (eval mode, no_grad); a backward step (the sum of every
tensor of the output, on a deep copy in train mode, or in eval mode where the original fails a
train-mode step at batch 2) gives a gradient to every parameter that the original's backward reaches
and to every parameter resify adds; and for preserve_output, the outputs equal the original's
(max|a - b| / max|b| <= 1e-4). A model passes when both conversions succeed and pass every check.

Each model runs in its own process (forked from a forkserver) (all its memory is returned when it ends, and it is
stopped after ``--timeout`` seconds). One row is printed per model as it goes, and a Markdown table
with the counts is (re)written to ``--out`` (default benchmarks/results/timm.md) after each model.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import multiprocessing as mp
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

import resify
from benchmarks.common import machine
from benchmarks.zoo_sizes import _commit, _first_line, _md, _quiet, _relative_diff, _shapes

__all__ = ["check_timm", "select_models"]

MAX_PARAMS = 200_000_000
BUILD_LIMIT_S = 120.0
TIMEOUT_S = 1500.0
RTOL = 1e-4
POLICIES: dict[str, dict[str, Any]] = {"default": {}, "preserve_output": {"preserve_output": True}}
#: Phases of one model's check; a time-out in one of RESIFY_PHASES is a resify failure, else a skip.
RESIFY_PHASES = {"convert default", "convert preserve_output", "check default", "check preserve_output"}


# ---------------------------------------------------------------------------------------------- helpers
def _leaves(out: Any) -> list[torch.Tensor]:
    """Every tensor in an output (a tensor, or tuples/lists/dicts/namedtuples of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _leaves(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _leaves(o)]
    return []


def _loss(out: Any) -> torch.Tensor:
    """The sum of every floating-point tensor of the output (what backward starts from)."""
    return sum(t.float().sum() for t in _leaves(out) if t.is_floating_point())


def _step(model: torch.nn.Module, x: torch.Tensor, train: bool) -> dict[str, bool]:
    """Forward and backward (sum of the output) on a deep copy in train or eval mode; returns
    {parameter name (every alias): whether it got a gradient}. Raises what the model raises."""
    m = copy.deepcopy(model).train(train)
    try:
        with _quiet():
            out = m(x)
        _loss(out).backward()
        return {n: p.grad is not None for n, p in m.named_parameters(remove_duplicate=False)}
    finally:
        del m


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _input_size(model: torch.nn.Module) -> tuple[int, ...]:
    cfg = getattr(model, "default_cfg", None) or getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", (3, 224, 224)))


def _fx_traces(model: torch.nn.Module) -> str:
    """Whether torch.fx.symbolic_trace itself traces the model: 'yes' or 'no: <error's first line>'."""
    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            torch.fx.symbolic_trace(model)
        return "yes"
    except Exception as e:
        return "no: " + _first_line(e)


def select_models(names: list[str], every: int, limit: int | None) -> list[str]:
    """The explicit ``names``, else every ``every``-th of sorted(timm.list_models()); the first ``limit``."""
    import timm

    chosen = names or sorted(timm.list_models())[::every]
    return chosen[:limit] if limit else chosen


# ---------------------------------------------------------------------------------------- one model
def check_timm(
    name: str,
    max_params: int = MAX_PARAMS,
    build_limit: float = BUILD_LIMIT_S,
    phase: Any = None,
    show_traceback: bool = False,
) -> dict[str, Any]:
    """Build timm model ``name``, convert it with both policies and check it; returns a row.

    ``row['status']`` is one of 'passed', 'failed', 'refused', 'skipped (size)', 'skipped (time)',
    'original fails'; ``row['message']`` says why (for all but 'passed'). ``phase(text)`` is called
    as each phase starts (the parent process uses it to tell where a time-out struck).
    """
    import timm

    def enter(text: str) -> None:
        if phase is not None:
            phase(text)

    t0 = time.perf_counter()
    row: dict[str, Any] = {
        "model": name,
        "params": None,
        "input": None,
        "status": None,
        "message": "",
        "sites": None,
        "existing": None,
        "added": None,
        "max_rel": None,
        "note": "",
        "fx": None,
        "problems": [],
    }

    def done(status: str, message: str = "") -> dict[str, Any]:
        row.update(status=status, message=_one_line(message), seconds=time.perf_counter() - t0)
        return row

    def tb() -> None:
        if show_traceback:
            traceback.print_exc()

    # size first, on the meta device: a model over the limit is never built for real
    enter("count")
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            meta = timm.create_model(name, pretrained=False)
        row["params"] = sum(p.numel() for p in meta.parameters())
        del meta
    except Exception:
        pass
    if row["params"] is not None and row["params"] > max_params:
        return done("skipped (size)", f"{row['params'] / 1e6:.0f}M parameters > {max_params / 1e6:.0f}M")

    enter("build")
    tb0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(name, pretrained=False).eval()
    except Exception as e:
        tb()
        return done("original fails", f"build: {_first_line(e)}")
    build_s = time.perf_counter() - tb0
    row["params"] = sum(p.numel() for p in model.parameters())
    if row["params"] > max_params:
        return done("skipped (size)", f"{row['params'] / 1e6:.0f}M parameters > {max_params / 1e6:.0f}M")
    if build_s > build_limit:
        return done("skipped (time)", f"building took {build_s:.0f} s > {build_limit:.0f} s")
    size = _input_size(model)
    row["input"] = "×".join(map(str, size))
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))

    # the original: eval forward, then a backward step (train mode, else eval mode)
    enter("original eval")
    try:
        with torch.no_grad(), warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            out0 = model(x)
    except Exception as e:
        tb()
        return done("original fails", f"eval forward: {_first_line(e)}")
    enter("original backward")
    train = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            grads0 = _step(model, x, train=True)
    except Exception as e:
        train = False
        row["note"] = f"backward in eval mode (the original's train step fails: {_first_line(e)})"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                grads0 = _step(model, x, train=False)
        except Exception as e2:
            tb()
            return done("original fails", f"backward: {_first_line(e2)}")
    reached = {n for n, g in grads0.items() if g}
    original_names = set(grads0)
    gc.collect()

    # convert with both policies
    converted: dict[str, torch.nn.Module] = {}
    refusals, failures = [], []
    for policy, kwargs in POLICIES.items():
        enter(f"convert {policy}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converted[policy] = resify.apply(model, x, **kwargs)
        except resify.ResifyError as e:
            tb()
            refusals.append(f"{policy}: {type(e).__name__}: {_one_line(e)}")
        except Exception as e:
            tb()
            failures.append(f"{policy}: conversion raises {_first_line(e)}")
    if "default" in converted:
        plan = resify.applied_plan(converted["default"])
        row.update(sites=len(plan.sites), existing=len(plan.existing), added=plan.added_params)

    # check each conversion
    for policy, conv in converted.items():
        enter(f"check {policy}")
        problems = []
        try:
            conv.eval()
            with torch.no_grad(), warnings.catch_warnings(), _quiet():
                warnings.simplefilter("ignore")
                out = conv(x)
            if _shapes(out) != _shapes(out0):
                problems.append(f"output shapes {_shapes(out)} != original's {_shapes(out0)}")
            elif policy == "preserve_output":
                a, b = _leaves(out), _leaves(out0)
                rel = max(_relative_diff(u, v)[0] for u, v in zip(a, b)) if a else 0.0
                row["max_rel"] = rel
                if not rel <= RTOL:
                    problems.append(f"outputs differ: max relative difference {rel:.2e} > {RTOL:g}")
            del out
        except Exception as e:
            tb()
            problems.append(f"eval forward raises {_first_line(e)}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                grads = _step(conv, x, train=train)
            added = sorted(set(grads) - original_names)
            missing = sorted(n for n in reached if not grads.get(n, False))
            missing += [n for n in added if not grads[n]]
            if missing:
                problems.append(
                    f"{len(missing)} parameters get no gradient ({', '.join(missing[:4])}"
                    + (", …" if len(missing) > 4 else "")
                    + ")"
                )
        except Exception as e:
            tb()
            problems.append(f"{'train' if train else 'eval'}-mode backward raises {_first_line(e)}")
        failures += [f"{policy}: {p}" for p in problems]
        gc.collect()
    row["problems"] = failures
    if failures:
        return done("failed", "; ".join(failures + refusals))
    if refusals:
        enter("fx check")
        row["fx"] = _fx_traces(model)
        return done("refused", "; ".join(refusals))
    return done("passed")


# --------------------------------------------------------------------------------- child processes
def _child(name: str, conn: Any, max_params: int, build_limit: float, threads: int = 2) -> None:
    torch.set_num_threads(threads)
    try:
        row = check_timm(name, max_params, build_limit, phase=lambda p: conn.send(("phase", p)))
    except BaseException as e:
        row = {"model": name, "status": "failed", "message": f"sweep error: {_first_line(e)}", "crash": True}
    conn.send(("row", row))
    conn.close()


_CTX: Any = None


def _context() -> Any:
    """A forkserver: each model's process is forked from a server that imported torch, timm and
    resify but never ran a torch op (forking a process that has used torch's thread pool can hang)."""
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["__main__", "torch", "timm", "resify"])
    return _CTX


def run_isolated(name: str, max_params: int, build_limit: float, timeout: float, threads: int = 2) -> dict[str, Any]:
    """check_timm in a forked child, stopped after ``timeout`` s (or ``build_limit`` s of building)."""
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    t0 = time.perf_counter()
    proc = ctx.Process(target=_child, args=(name, child, max_params, build_limit, threads), daemon=True)
    proc.start()
    child.close()
    phase, phase_t, row = "start", t0, None
    while row is None:
        now = time.perf_counter()
        limit = min(t0 + timeout, phase_t + build_limit + 5 if phase == "build" else float("inf"))
        if parent.poll(max(0.0, min(limit - now, 5.0))):
            try:
                kind, value = parent.recv()
            except EOFError:
                break
            if kind == "phase":
                phase, phase_t = value, time.perf_counter()
            else:
                row = value
        elif time.perf_counter() >= limit or not proc.is_alive() and not parent.poll():
            break
    if row is None:
        elapsed = time.perf_counter() - t0
        if proc.is_alive():
            proc.kill()
            proc.join(10)
            why = (
                f"building took over {build_limit:.0f} s"
                if phase == "build"
                else f"stopped after {elapsed:.0f} s (time limit) in phase '{phase}'"
            )
            status = "failed" if phase in RESIFY_PHASES else "skipped (time)"
        else:
            proc.join(10)
            why = f"the process died (exit code {proc.exitcode}, e.g. out of memory) in phase '{phase}'"
            status = "failed" if phase in RESIFY_PHASES else "original fails"
        row = {"model": name, "status": status, "message": why, "seconds": elapsed}
    proc.join(10)
    parent.close()
    return row


# ------------------------------------------------------------------------------------------ report
STATUSES = ["passed", "refused", "failed", "original fails", "skipped (size)", "skipped (time)"]


def counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    c = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    c["considered"] = len(rows)
    c["asked"] = c["passed"] + c["refused"] + c["failed"]
    c["pass_pct"] = 100.0 * c["passed"] / c["asked"] if c["asked"] else float("nan")
    return c


def _m(n: Any) -> str:
    return "" if n is None else f"{n / 1e6:.1f}"


def write_markdown(path: Path, rows: list[dict[str, Any]], header: str, elapsed: float, done: bool, total: int) -> None:
    c = counts(rows)
    lines = [
        header,
        "",
        "# resify over timm models",
        "",
        f"Machine: {machine()}  ",
        f"Wall time: {elapsed / 60:.1f} min" + ("" if done else f" (in progress: {len(rows)} of {total} models)"),
        "",
        "Each model: `timm.create_model(name, pretrained=False)` after `torch.manual_seed(0)`, eval mode, a "
        "random input of its `default_cfg['input_size']` with batch 2. Converted by `resify.apply(model, x)` "
        "and `resify.apply(model, x, preserve_output=True)`; passed = both convert, both give the original's "
        "output shapes, a backward step (sum of the output; a train-mode deep copy, or eval mode where the "
        "original's train step fails) gives a gradient to every parameter the original's reaches and to every "
        f"added one, and preserve_output's outputs equal the original's (max|a−b|/max|b| ≤ {RTOL:g}: rel). "
        f"Models over {MAX_PARAMS / 1e6:.0f}M parameters are skipped by size; those timm cannot build or run "
        'are "original fails". sites / existing / +params: the default conversion\'s.',
        "",
        "| model | params (M) | input | status | sites | existing | +params (M) | rel | sec | note |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        rel = "" if r.get("max_rel") is None else f"{r['max_rel']:.1e}"
        note = r.get("message") or r.get("note") or ""
        if r.get("message") and r.get("note"):
            note += "; " + r["note"]
        lines.append(
            f"| {r['model']} | {_m(r.get('params'))} | {r.get('input') or ''} | {r['status']} | "
            f"{'' if r.get('sites') is None else r['sites']} | "
            f"{'' if r.get('existing') is None else r['existing']} | {_m(r.get('added'))} | {rel} | "
            f"{r.get('seconds', 0):.1f} | {_md(note, 140)} |"
        )
    lines += [
        "",
        "## Counts",
        "",
        f"- models considered: **{c['considered']}**",
        f"- skipped by size (> {MAX_PARAMS / 1e6:.0f}M parameters): {c['skipped (size)']}",
        f"- skipped by time: {c['skipped (time)']}",
        f"- original fails (timm cannot build or run it): {c['original fails']}",
        f"- asked to convert: {c['asked']}",
        f"- converted and passing: **{c['passed']}**",
        f"- refused: **{c['refused']}**",
        f"- failing: **{c['failed']}**",
        f"- pass percentage (of those asked to convert): **{c['pass_pct']:.1f}%**",
    ]
    sections = [
        ("Refused", "refused"),
        ("Failing", "failed"),
        ("Original fails", "original fails"),
        ("Skipped by size", "skipped (size)"),
        ("Skipped by time", "skipped (time)"),
    ]
    for title, status in sections:
        items = []
        for r in rows:
            if r["status"] != status:
                continue
            item = f"- {r['model']}: {_md(r.get('message', ''))}"
            if r.get("fx"):
                item += f" (torch.fx.symbolic_trace on the model: {_md(r['fx'])})"
            items.append(item)
        if items:
            lines += ["", f"## {title}", "", *items]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# -------------------------------------------------------------------------------------------- main
def main() -> int:
    import timm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="timm model names (default: every --every-th of the sorted list)")
    parser.add_argument("--every", type=int, default=13, help="take every N-th name of sorted(timm.list_models())")
    parser.add_argument("--limit", type=int, default=None, help="only the first N of the selected models")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "timm.md",
        help="the Markdown results file (default: benchmarks/results/timm.md)",
    )
    parser.add_argument("--max-params", type=float, default=MAX_PARAMS, help="skip larger models (default 200e6)")
    parser.add_argument(
        "--build-limit", type=float, default=BUILD_LIMIT_S, help="skip a model whose build takes longer (s)"
    )
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="stop one model's whole check after this (s)")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (default 2; on a machine others share, 1 can be many times faster)",
    )
    parser.add_argument("--in-process", action="store_true", help="no child processes (no time-out); for debugging")
    parser.add_argument("--traceback", action="store_true", help="print tracebacks of failures (with --in-process)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = select_models(args.models, args.every, args.limit)
    command = "python -m benchmarks.timm_sweep" + "".join(f" {a}" for a in sys.argv[1:])
    header = (
        f"`{command}` — {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} — commit {_commit()}"
        f" — torch {torch.__version__}, timm {timm.__version__}"
    )
    print(header, flush=True)
    print(f"{len(names)} models (of {len(timm.list_models())} in timm), {torch.get_num_threads()} threads", flush=True)
    print(f"{'model':44} {'params':>7} {'status':15} {'sites':>5} {'rel':>8} {'sec':>6}  message", flush=True)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for name in names:
        if args.in_process:
            row = check_timm(name, int(args.max_params), args.build_limit, show_traceback=args.traceback)
        else:
            row = run_isolated(name, int(args.max_params), args.build_limit, args.timeout, args.threads)
        rows.append(row)
        rel = "" if row.get("max_rel") is None else f"{row['max_rel']:.1e}"
        params = "" if row.get("params") is None else f"{row['params'] / 1e6:.1f}M"
        sites = "" if row.get("sites") is None else str(row["sites"])
        msg = row.get("message") or row.get("note") or ""
        print(
            f"{name:44} {params:>7} {row['status']:15} {sites:>5} {rel:>8} {row.get('seconds', 0):6.1f}  {msg}",
            flush=True,
        )
        gc.collect()
        write_markdown(args.out, rows, header, time.perf_counter() - t0, done=False, total=len(names))
    elapsed = time.perf_counter() - t0
    write_markdown(args.out, rows, header, elapsed, done=True, total=len(names))
    c = counts(rows)
    print(
        f"\n{c['considered']} models considered in {elapsed / 60:.1f} min: {c['skipped (size)']} skipped by size, "
        f"{c['skipped (time)']} skipped by time, {c['original fails']} original fails; {c['asked']} asked to "
        f"convert: {c['passed']} passed, {c['refused']} refused, {c['failed']} failing "
        f"({c['pass_pct']:.1f}% pass). Written to {args.out}",
        flush=True,
    )
    return 1 if c["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
