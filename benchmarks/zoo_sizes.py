"""Is the converted model a drop-in replacement at input sizes other than the example's? The torchvision zoo.

    .venv/bin/python -m benchmarks.zoo_sizes                   # the whole zoo (~80 models)
    .venv/bin/python -m benchmarks.zoo_sizes resnet18 vgg11     # some models
    .venv/bin/python -m benchmarks.zoo_sizes --out /tmp/sizes.md

Each torchvision classification model (weights=None, torch.manual_seed(0) before it is built, eval
mode) is converted at its usual size (``resify.constants.image_size``: 299 for inception, else 224) with batch 2,
twice: the default policy (``resify.apply(model, x)``) and ``preserve_output=True``; a ResifyError
means refused, with its reason. Then, in eval mode under torch.no_grad(), the original and both
converted models run on fresh random inputs of four geometries: the usual size with batch 2 (the
example's shape), 160×160 batch 1, 256×256 batch 1, the usual size batch 3. A regression is: the
original runs and a converted model raises; the output shapes differ; or (preserve_output) the
outputs differ: max|a - b| / max|b| > 1e-4 or not torch.allclose(a, b, rtol=1e-4, atol=1e-5).
Last a training step at the usual size, batch 1 and batch 2 (every model, the largest included:
the whole check of vit_h_14 took under 2 minutes on 2 shared cores, so no model is shrunk to 160): a deep copy
of the original and of the default conversion in train mode, forward and ``out.sum().backward()``
(for a tuple/namedtuple output, googlenet's and inception's, its first element: ``.logits``); a
regression is the original succeeding and the converted raising, or the outputs' shapes differing.
An input that the original itself cannot take (ViT at 160 or 256) is "both fail" when the converted
fails too, and is no regression.

Prints one row per model as it goes and writes a Markdown table (rewritten after every model, so a
partial sweep leaves its rows) to ``--out`` (default benchmarks/results/zoo-sizes.md).
``check_sizes(name)`` checks one model and returns a dict; ``tests/test_zoo_sizes.py`` runs it on a
subset.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import resify
from benchmarks.common import machine
from resify.constants import image_size

__all__ = ["check_sizes", "LABELS", "POLICIES"]

#: The converted models, by name: the keyword arguments given to resify.apply.
POLICIES: dict[str, dict[str, Any]] = {"default": {}, "preserve_output": {"preserve_output": True}}
#: The eval-mode inputs: label -> (side, batch); side None means the model's usual size.
EVAL_INPUTS: dict[str, tuple[int | None, int]] = {
    "usual b2": (None, 2),
    "160 b1": (160, 1),
    "256 b1": (256, 1),
    "usual b3": (None, 3),
}
#: The training steps: label -> (side, batch), both at the usual size.
TRAIN_INPUTS: dict[str, tuple[int | None, int]] = {"train b1": (None, 1), "train b2": (None, 2)}
LABELS = [*EVAL_INPUTS, *TRAIN_INPUTS]
RTOL, ATOL = 1e-4, 1e-5


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _shapes(out: Any) -> Any:
    """The output's structure with every tensor replaced by its shape (to compare two outputs)."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return [_shapes(o) for o in out]
    if isinstance(out, dict):
        return {k: _shapes(v) for k, v in out.items()}
    return type(out).__name__


def _main_output(out: Any) -> torch.Tensor:
    """The logits: the output itself, or ``.logits`` / the first element of a tuple or namedtuple."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


def _quiet() -> contextlib.AbstractContextManager:
    """A GraphModule that raises prints its generated code's traceback to stderr: kept out of the log."""
    return contextlib.redirect_stderr(io.StringIO())


def _run(model: torch.nn.Module, x: torch.Tensor) -> tuple[Any, str | None]:
    """Eval-mode forward under no_grad: (output, None), or (None, the error's first line)."""
    try:
        with torch.no_grad(), _quiet():
            return model(x), None
    except Exception as e:
        return None, _first_line(e)


def _train_step(model: torch.nn.Module, x: torch.Tensor) -> tuple[Any, str | None]:
    """Forward and backward on a train-mode deep copy: (the output's shapes, None) or (None, error)."""
    m = copy.deepcopy(model).train()
    try:
        with _quiet():
            out = m(x)
        shapes = _shapes(out)
        _main_output(out).sum().backward()
        return shapes, None
    except Exception as e:
        return None, _first_line(e)
    finally:
        del m


def _relative_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, bool]:
    """max|a - b| / max|b| and whether a is within tolerance of b (the original's output)."""
    a, b = a.double(), b.double()
    rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
    return rel, rel <= RTOL and torch.allclose(a, b, rtol=RTOL, atol=ATOL)


def _compare(
    label: str,
    ref: tuple[Any, str | None],
    runs: dict[str, tuple[Any, str | None]],
    exact: set[str],
    regressions: list[str],
    failures: list[str],
    shapes: Any = _shapes,
) -> tuple[str, float | None]:
    """Compare the converted models' results with the original's on one input; returns the table cell
    and the largest relative difference among the ``exact`` (preserve_output) models. ``shapes`` maps
    an output to its shapes (the identity for training steps, which return shapes already)."""
    out0, err0 = ref
    worst: float | None = None
    problems = []
    for policy, (out, err) in runs.items():
        if err0 is not None:
            continue
        if err is not None:
            problems.append(f"{policy}: converted raises {err}")
        elif shapes(out) != shapes(out0):
            problems.append(f"{policy}: output shapes {shapes(out)} != original's {shapes(out0)}")
        elif policy in exact:
            rel, close = _relative_diff(_main_output(out), _main_output(out0))
            worst = rel if worst is None else max(worst, rel)
            if not close:
                problems.append(f"{policy}: outputs differ, max relative difference {rel:.2e}")
    if err0 is not None:
        conv_errs = [f"{p}: {e}" if e else f"{p} runs" for p, (_, e) in runs.items()]
        failures.append(f"{label}: original raises {err0}; " + "; ".join(conv_errs))
        return ("both fail" if all(e for _, e in runs.values()) else "original fails only"), None
    regressions.extend(f"{label}: {p}" for p in problems)
    if problems:
        return "REGRESSION: " + "; ".join(problems), worst
    return ("ok" if worst is None else f"ok (rel {worst:.1e})"), worst


def check_sizes(name: str) -> dict[str, Any]:
    """Convert torchvision model ``name`` (default policy and preserve_output) and check it as a
    drop-in replacement at other input sizes and in a training step.

    Returns a dict: ``model``, ``params``, ``status`` ('converted' | 'refused' | 'partly refused' |
    'error'), ``reason`` (why refused, or None), ``refused`` (policy -> reason), ``results`` (label ->
    the table cell), ``regressions`` (list of 'label: policy: what'; empty when all is well),
    ``original_failures`` (inputs the original cannot take, with both sides' errors), ``max_rel``
    (the largest preserve_output relative difference; None if not measured) and ``seconds``.
    """
    import torchvision

    t0 = time.perf_counter()
    row: dict[str, Any] = {
        "model": name,
        "reason": None,
        "refused": {},
        "results": {},
        "regressions": [],
        "original_failures": [],
        "max_rel": None,
    }
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None).eval()
    row["params"] = sum(p.numel() for p in model.parameters())
    usual = image_size(name)
    x = torch.randn(2, 3, usual, usual)
    converted: dict[str, torch.nn.Module] = {}
    for policy, kwargs in POLICIES.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converted[policy] = resify.apply(model, x, **kwargs).eval()
        except resify.ResifyError as e:
            row["refused"][policy] = str(e)
        except Exception as e:
            row["refused"][policy] = f"crashed: {_first_line(e)}"
            row["regressions"].append(f"conversion ({policy}): crashed with {_first_line(e)}")
    del x
    if any(r.startswith("conversion") for r in row["regressions"]):
        row["status"] = "error"
    elif not row["refused"]:
        row["status"] = "converted"
    else:
        row["status"] = "refused" if not converted else "partly refused"
    if row["refused"]:
        row["reason"] = "; ".join(f"{p}: {r}" for p, r in row["refused"].items())
    if not converted:
        row["seconds"] = time.perf_counter() - t0
        return row

    gen = torch.Generator().manual_seed(1)
    exact = {p for p in converted if POLICIES[p].get("preserve_output")}
    for label, (side, batch) in EVAL_INPUTS.items():
        s = side or usual
        xi = torch.randn(batch, 3, s, s, generator=gen)
        ref = _run(model, xi)
        runs = {p: _run(m, xi) for p, m in converted.items()}
        cell, worst = _compare(label, ref, runs, exact, row["regressions"], row["original_failures"])
        row["results"][label] = cell
        if worst is not None:
            row["max_rel"] = worst if row["max_rel"] is None else max(row["max_rel"], worst)
        del ref, runs, xi

    for p in [p for p in converted if p != "default"]:  # the training step uses the default conversion
        del converted[p]
    gc.collect()
    if "default" in converted:
        for label, (side, batch) in TRAIN_INPUTS.items():
            s = side or usual
            xi = torch.randn(batch, 3, s, s, generator=gen)
            ref = _train_step(model, xi)
            run = _train_step(converted["default"], xi)
            row["results"][label], _ = _compare(
                label, ref, {"default": run}, set(), row["regressions"], row["original_failures"], shapes=lambda s: s
            )
    del model, converted
    gc.collect()
    row["seconds"] = time.perf_counter() - t0
    return row


def _md(text: str, limit: int = 0) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if not limit or len(text) <= limit else text[: limit - 1] + "…"


def _short(cell: str) -> str:
    if cell.startswith("REGRESSION"):
        return "REGRESSION"
    return cell.replace("original fails only", "orig-fails").replace("ok (rel ", "ok(")


def _counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "models": len(rows),
        "converted": sum(r["status"] == "converted" for r in rows),
        "with_regression": sum(bool(r["regressions"]) for r in rows),
        "regressions": sum(len(r["regressions"]) for r in rows),
        "refused": sum(r["status"] == "refused" for r in rows),
        "partly_refused": sum(r["status"] == "partly refused" for r in rows),
        "errors": sum(r["status"] == "error" for r in rows),
        "both_fail": sum(c == "both fail" for r in rows for c in r["results"].values()),
    }


def _commit() -> str:
    """The repository's HEAD, and whether resify/ has uncommitted changes (for the results file)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "resify"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with uncommitted changes to resify/" if dirty else "")


def write_markdown(
    path: Path, rows: list[dict[str, Any]], command: str, elapsed: float, done: bool, commit: str = "unknown"
) -> None:
    c = _counts(rows)
    lines = [
        "# The zoo at other input sizes: is the converted model a drop-in replacement?",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Commit: {commit} (when the sweep started)  ",
        f"Wall time: {elapsed / 60:.1f} min" + ("" if done else " (in progress: a partial sweep)"),
        "",
        "Each model: torchvision, weights=None, torch.manual_seed(0), eval mode; converted at its usual size "
        "(299 for inception, else 224) with batch 2 by `resify.apply(model, x)` (default) and with "
        "`preserve_output=True`. Eval-mode inputs under no_grad (fresh random values): usual size batch 2, "
        "160×160 batch 1, 256×256 batch 1, usual size batch 3: ok = both converted models run, give the "
        "original's output shapes, and preserve_output's outputs equal the original's "
        f"(max|a−b|/max|b| ≤ {RTOL:g} and allclose(rtol={RTOL:g}, atol={ATOL:g}); rel = that figure). Training "
        "step (train b1, train b2: usual size, every model, none shrunk to 160): a deep copy of the original "
        "and of the default conversion in train mode, forward and `out.sum().backward()` (first element / "
        "`.logits` of a tuple output); ok = both succeed with the same output shapes. A regression: the "
        "original succeeds and a converted model raises, or shapes or (preserve_output) values differ. "
        '"both fail": the original cannot take that input either (no regression).',
        "",
        "| model | params (M) | conversion | " + " | ".join(LABELS) + " | sec |",
        "|---|---:|---|" + "---|" * len(LABELS) + "---:|",
    ]
    for r in rows:
        status = r["status"] if not r["reason"] else f"{r['status']}: {_md(r['reason'], 100)}"
        cells = [_md(r["results"].get(label, "—"), 160) for label in LABELS]
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f} | {status} | " + " | ".join(cells) + f" | {r['seconds']:.1f} |"
        )
    lines += [
        "",
        f"**Models checked: {c['models']}** ({c['converted']} converted, {c['refused']} refused"
        + (f", {c['partly_refused']} refused by one policy" if c["partly_refused"] else "")
        + (f", {c['errors']} crashed in conversion" if c["errors"] else "")
        + f"); **models with any regression: {c['with_regression']}; total regressions: {c['regressions']}; "
        f"refused: {c['refused']}**. Inputs that both the original and the converted models fail: "
        f"{c['both_fail']}.",
    ]
    maxrel = [r["max_rel"] for r in rows if r["max_rel"] is not None]
    if maxrel:
        lines.append(f"Largest preserve_output relative difference over all models and inputs: {max(maxrel):.2e}.")
    lines += ["", "## Regressions", ""]
    regs = [f"- {r['model']}, {_md(g)}" for r in rows for g in r["regressions"]]
    lines += regs or ["None."]
    refused = [f"- {r['model']}: {_md(r['reason'])}" for r in rows if r["reason"]]
    if refused:
        lines += ["", "## Refused", "", *refused]
    fails = [f"- {r['model']}, {_md(f)}" for r in rows for f in r["original_failures"]]
    if fails:
        lines += ["", "## Inputs the original model cannot take", "", *fails]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="models to check (default: every classification model)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "zoo-sizes.md",
        help="the Markdown results file (default: benchmarks/results/zoo-sizes.md)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (default 2; on a machine others share, 1 can be many times faster)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    command = "python -m benchmarks.zoo_sizes" + "".join(f" {a}" for a in sys.argv[1:])
    print(
        f"{len(names)} models; torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    print(f"{'model':22} {'params':>7}  {'status':9} " + " ".join(f"{lb:>11}" for lb in LABELS) + "    sec", flush=True)
    rows = []
    commit = _commit()
    t0 = time.perf_counter()
    for name in names:
        row = check_sizes(name)
        rows.append(row)
        if not row["results"]:
            print(f"{name:22} {row['params'] / 1e6:6.1f}M  {row['status']:9} {row['reason']}", flush=True)
        else:
            print(
                f"{name:22} {row['params'] / 1e6:6.1f}M  {row['status']:9} "
                + " ".join(f"{_short(row['results'].get(lb, '-')):>11}" for lb in LABELS)
                + f" {row['seconds']:6.1f}",
                flush=True,
            )
        for g in row["regressions"]:
            print(f"    regression: {g}", flush=True)
        gc.collect()
        write_markdown(args.out, rows, command, time.perf_counter() - t0, done=False, commit=commit)
    elapsed = time.perf_counter() - t0
    write_markdown(args.out, rows, command, elapsed, done=True, commit=commit)
    c = _counts(rows)
    print(
        f"\n{c['models']} models checked in {elapsed / 60:.1f} min: {c['converted']} converted, "
        f"{c['refused']} refused, {c['partly_refused']} refused by one policy, {c['errors']} crashed; "
        f"{c['with_regression']} with a regression, {c['regressions']} regressions in all; "
        f"{c['both_fail']} inputs that the original fails too. Written to {args.out}",
        flush=True,
    )
    return 1 if c["regressions"] else 0


if __name__ == "__main__":
    sys.exit(main())
