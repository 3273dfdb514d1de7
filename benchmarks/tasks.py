"""Every torchvision detection, segmentation and video model, converted: where its shortcuts go, and
whether the converted model still takes and returns what the original does.

    .venv/bin/python -m benchmarks.tasks                                  # all of them (~27 models)
    .venv/bin/python -m benchmarks.tasks ssdlite320_mobilenet_v3_large r3d_18
    .venv/bin/python -m benchmarks.tasks --out /tmp/tasks.md

Each model is built by ``torchvision.models.get_model(name, weights=None)`` (and
``weights_backbone=None`` for detection and segmentation: nothing is downloaded) after
``torch.manual_seed(0)``, at small sizes (``build``): detectors with ``min_size=128, max_size=160``
(SSD's transform resizes to its fixed 300 or 320) and a score threshold of 0, so that random weights
still give boxes to compare, at most 20 per image (R-CNNs with 100 proposals per image, not 1,000).
The example (``example``): for detectors two images of different sizes in a list,
``([3×120×150, 3×100×128],)``; for segmentation a batch of two 3×64×80 images; for video one clip
of 4×32×32 frames (s3d and MViT take 16×224×224, the sizes their pooling and position embeddings
need; Swin3D 8×64×64). One torch thread unless ``--threads``.

The model is converted in eval mode by ``resify.api.converted(model, example, preserve_output=True)``
(a ResifyError is a refusal; anything else a crash). Then, in eval mode, the original and the
converted model run on the example and on a second input of other sizes (detectors: three other
images; segmentation and video: another size): their outputs must have the same structure and be
equal (``torch.testing.assert_close`` with ``RTOL``/``ATOL``). Last a training step: both in train
mode, from the same random state, on the example (detectors with targets, ``targets``); detectors
must return loss dicts with the same keys and values, the others outputs of the same shapes; the
converted model's ``sum(losses.values()).backward()`` (or the sum of its outputs) must give every
parameter resify added a gradient.

Prints one row per model and writes ``--out`` (default benchmarks/results/tasks.md), rewritten after
every model. ``build``, ``example``, ``other_input`` and ``targets`` are what
``tests/test_torchvision_tasks.py`` builds its models and inputs with.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

import resify
from benchmarks.common import machine
from benchmarks.zoo_sizes import _commit, _first_line, _md, _quiet
from resify.api import converted as convert
from resify.constants import NAMESPACE

__all__ = ["TASKS", "task_of", "build", "example", "other_input", "targets", "resify_parameters", "check_task", "main"]

#: The torchvision modules swept, by task.
TASKS = ("detection", "segmentation", "video")
#: Outputs of the converted model (preserve_output=True) against the original's.
RTOL, ATOL = 1e-4, 1e-5
#: SSD resizes every image to its fixed size: min_size/max_size are not its arguments.
_FIXED_SIZE = ("ssd300_vgg16", "ssdlite320_mobilenet_v3_large")
#: R-CNN proposals kept before and after the RPN's NMS, and RoIs sampled per image in training.
_FEWER_PROPOSALS = {
    "rpn_pre_nms_top_n_test": 200,
    "rpn_post_nms_top_n_test": 100,
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "box_batch_size_per_image": 64,
}
#: Clips of the sizes these video models need (their pooling, their position embeddings); others 4×32×32.
_CLIPS: dict[str, tuple[int, int, int]] = {
    "s3d": (16, 224, 224),
    "mvit_v1_b": (16, 224, 224),
    "mvit_v2_s": (16, 224, 224),
    "swin3d_t": (8, 64, 64),
    "swin3d_s": (8, 64, 64),
    "swin3d_b": (8, 64, 64),
}
#: A second clip for the same models: another size where the model takes one, else the same size.
_OTHER_CLIPS: dict[str, tuple[int, int, int]] = {
    "s3d": (24, 224, 224),
    "mvit_v1_b": (16, 224, 224),
    "mvit_v2_s": (16, 224, 224),
    "swin3d_t": (6, 48, 80),
    "swin3d_s": (6, 48, 80),
    "swin3d_b": (6, 48, 80),
}


def task_of(name: str) -> str:
    """'detection', 'segmentation' or 'video': the torchvision module that lists ``name``."""
    import torchvision

    for task in TASKS:
        if name in torchvision.models.list_models(module=getattr(torchvision.models, task)):
            return task
    raise ValueError(f"{name} is not a torchvision detection, segmentation or video model")


def build(name: str) -> nn.Module:
    """The model at small sizes, random weights (``torch.manual_seed(0)``), nothing downloaded, eval mode."""
    import torchvision

    task = task_of(name)
    kwargs: dict[str, Any] = {"weights": None}
    if task in ("detection", "segmentation"):
        kwargs["weights_backbone"] = None
    if task == "detection":
        if name not in _FIXED_SIZE:
            kwargs.update(min_size=128, max_size=160)
        # random weights score every box low: a threshold of 0 keeps boxes to compare (20 per image)
        if "rcnn" in name:  # and fewer proposals than the 1,000-2,000 per image of full-size images
            kwargs.update(box_score_thresh=0.0, box_detections_per_img=20, **_FEWER_PROPOSALS)
        else:
            kwargs.update(score_thresh=0.0, detections_per_img=20)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, **kwargs).eval()


def _images(sizes: list[tuple[int, int]], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=gen) for h, w in sizes]


def example(name: str) -> tuple[Any, ...]:
    """The positional inputs the model is converted on (see the module docstring)."""
    task = task_of(name)
    gen = torch.Generator().manual_seed(0)
    if task == "detection":
        return (_images([(120, 150), (100, 128)], seed=0),)
    if task == "segmentation":
        return (torch.rand(2, 3, 64, 80, generator=gen),)
    return (torch.rand(1, 3, *_CLIPS.get(name, (4, 32, 32)), generator=gen),)


def other_input(name: str) -> tuple[Any, ...]:
    """Inputs of other sizes than the example's (the converted model is a drop-in replacement)."""
    task = task_of(name)
    gen = torch.Generator().manual_seed(1)
    if task == "detection":
        return (_images([(96, 96), (140, 110), (128, 160)], seed=1),)
    if task == "segmentation":
        return (torch.rand(3, 3, 72, 56, generator=gen),)
    return (torch.rand(2, 3, *_OTHER_CLIPS.get(name, (6, 40, 48)), generator=gen),)


def targets(name: str, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Training targets for a detector, one dict per image: boxes and labels (and masks for Mask R-CNN,
    keypoints for Keypoint R-CNN), inside each image."""
    out = []
    for i, img in enumerate(images):
        h, w = img.shape[-2:]
        boxes = torch.tensor([[0.1 * w, 0.2 * h, 0.6 * w, 0.7 * h], [0.4 * w, 0.3 * h, 0.9 * w, 0.95 * h]])[: i + 1]
        # label 1 for every box: Keypoint R-CNN has 2 classes (background, person), and a label of 2 makes
        # the original itself raise IndexError "Target 2 is out of bounds" in its classification loss
        target = {"boxes": boxes, "labels": torch.ones(len(boxes), dtype=torch.int64)}
        if "mask" in name:
            masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
            for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                masks[k, y0:y1, x0:x1] = 1
            target["masks"] = masks
        if "keypoint" in name:
            points = torch.zeros(len(boxes), 17, 3)
            points[..., 0] = (boxes[:, None, 0] + boxes[:, None, 2]) / 2
            points[..., 1] = (boxes[:, None, 1] + boxes[:, None, 3]) / 2
            points[..., 2] = 1
            target["keypoints"] = points
        out.append(target)
    return out


def resify_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters resify added: those under a ``resify`` namespace (``<owner>.resify.<site>.*``)."""
    return {n: p for n, p in model.named_parameters() if f".{NAMESPACE}." in f".{n}"}


def _leaves(out: Any) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of an output with its path (``0.boxes``, ``out``): dicts, lists, tuples."""
    if isinstance(out, torch.Tensor):
        return [("", out)]
    items: list[tuple[Any, Any]] = []
    if isinstance(out, dict):
        items = list(out.items())
    elif isinstance(out, (list, tuple)):
        items = list(enumerate(out))
    return [(f"{k}.{p}".rstrip("."), t) for k, v in items for p, t in _leaves(v)]


def compare_outputs(got: Any, want: Any) -> tuple[str | None, float]:
    """(None or what differs, the largest absolute difference) between two outputs of the same model."""
    a, b = _leaves(got), _leaves(want)
    if [p for p, _ in a] != [p for p, _ in b]:
        return f"output structure {[p for p, _ in a]} != original's {[p for p, _ in b]}", float("nan")
    worst = 0.0
    for (path, x), (_, y) in zip(a, b):
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"{path or 'output'}: {x.dtype}{list(x.shape)} != original's {y.dtype}{list(y.shape)}", float("nan")
        if x.numel():
            worst = max(worst, (x.double() - y.double()).abs().max().item())
        try:
            torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL)
        except AssertionError as e:
            return f"{path or 'output'} differs: {_first_line(e)}", worst
    return None, worst


def _train_outputs(model: nn.Module, name: str, inputs: tuple[Any, ...]) -> Any:
    """The model's training-mode output on ``inputs`` (a detector's losses, given targets), from seed 0."""
    model.train()
    try:
        torch.manual_seed(0)
        with _quiet():
            if task_of(name) == "detection":
                return model(*inputs, targets(name, inputs[0]))
            return model(*inputs)
    finally:
        model.eval()


def _loss(out: Any) -> torch.Tensor:
    return sum(t.float().sum() for _, t in _leaves(out) if t.is_floating_point())  # type: ignore[return-value]


def _common_prefix(owners: list[str]) -> str:
    if not owners:
        return ""
    parts = [o.split(".") if o else [] for o in owners]
    prefix = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        prefix.append(level[0])
    return ".".join(prefix)


def _by_module(owners: list[str]) -> dict[str, int]:
    """Sites per top-level module of their owners (the root's own: "(root)"), most first."""
    counts: dict[str, int] = {}
    for owner in owners:
        top = owner.split(".")[0] if owner else "(root)"
        counts[top] = counts.get(top, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def check_task(name: str, show_traceback: bool = False) -> dict[str, Any]:
    """Build, convert and check one model; returns its row (see the module docstring).

    ``row['status']``: 'passed', 'failed' (a check failed: ``problems``), 'refused' (a ResifyError)
    or 'crashed' (anything else raised by resify or by running the converted model)."""
    t0 = time.perf_counter()
    row: dict[str, Any] = {
        "model": name,
        "task": task_of(name),
        "params": None,
        "status": None,
        "message": "",
        "sites": None,
        "owners": [],
        "prefix": None,
        "by_module": {},
        "root": None,
        "whole": [],
        "eval": None,
        "max_abs": None,
        "train": None,
        "problems": [],
        "convert_s": None,
    }

    def done(status: str, message: str = "") -> dict[str, Any]:
        row.update(status=status, message=message, seconds=time.perf_counter() - t0)
        return row

    model = build(name)
    row["params"] = sum(p.numel() for p in model.parameters())
    inputs = example(name)
    tc = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = convert(model, inputs, preserve_output=True)
    except resify.ResifyError as e:
        if show_traceback:
            traceback.print_exc()
        return done("refused", f"{type(e).__name__}: {' '.join(str(e).split())}")
    except Exception as e:
        if show_traceback:
            traceback.print_exc()
        return done("crashed", f"conversion: {_first_line(e)}")
    row["convert_s"] = time.perf_counter() - tc
    conv, plan = result.model, result.plan
    row.update(
        sites=len(plan.sites),
        owners=sorted({s.owner for s in plan.sites}),
        prefix=_common_prefix([s.owner for s in plan.sites]),
        by_module=_by_module([s.owner for s in plan.sites]),
        root="untraceable" if any(w.module == "" for w in plan.whole) else "traced",
        whole=[(w.module, w.code) for w in plan.whole],
    )
    problems = row["problems"]
    if type(conv) is not type(model):
        problems.append(f"the converted model is a {type(conv).__name__}, not a {type(model).__name__}")

    # eval mode: the example and another input, outputs equal
    worst = 0.0
    for label, xs in (("example", inputs), ("other sizes", other_input(name))):
        try:
            with torch.no_grad(), _quiet():
                want = model(*xs)
                got = conv(*xs)
        except Exception as e:
            if show_traceback:
                traceback.print_exc()
            problems.append(f"eval, {label}: raises {_first_line(e)}")
            continue
        why, diff = compare_outputs(got, want)
        worst = max(worst, diff) if diff == diff else worst
        if why:
            problems.append(f"eval, {label}: {why}")
    row["max_abs"] = worst
    row["eval"] = "equal" if not any(p.startswith("eval") for p in problems) else "DIFFERS"

    # train mode: the same losses (or output shapes) from the same random state, gradients everywhere
    try:
        want = _train_outputs(model, name, inputs)
        got = _train_outputs(conv, name, inputs)
        if row["task"] == "detection":
            if sorted(got) != sorted(want):
                problems.append(f"train: loss keys {sorted(got)} != original's {sorted(want)}")
            else:
                why, _ = compare_outputs({k: got[k] for k in sorted(got)}, {k: want[k] for k in sorted(want)})
                if why:
                    problems.append(f"train: losses differ: {why}")
        elif [(k, t.shape) for k, t in _leaves(got)] != [(k, t.shape) for k, t in _leaves(want)]:
            problems.append("train: the outputs' structure or shapes differ from the original's")
        _loss(got).backward()
        added = resify_parameters(conv)
        missing = sorted(n for n, p in added.items() if p.grad is None)
        if missing:
            problems.append(
                f"train: {len(missing)} of {len(added)} resify parameters get no gradient ({', '.join(missing[:3])})"
            )
        row["train"] = "ok" if not any(p.startswith("train") for p in problems) else "FAILS"
    except Exception as e:
        if show_traceback:
            traceback.print_exc()
        problems.append(f"train: raises {_first_line(e)}")
        row["train"] = "FAILS"
    del conv, model
    gc.collect()
    return done("failed" if problems else "passed", "; ".join(problems))


def names_of(tasks: list[str]) -> list[str]:
    import torchvision

    return [n for t in tasks for n in torchvision.models.list_models(module=getattr(torchvision.models, t))]


def _code(module: str) -> str:
    return f"`{module}`" if module else "(root)"


def write_markdown(
    path: Path,
    rows: list[dict[str, Any]],
    command: str,
    elapsed: float,
    done: bool,
    started: str = "",
    commit: str | None = None,
) -> None:
    lines = [
        "# torchvision detection, segmentation and video models, converted",
        "",
        f"Command: `{command}`  ",
        *([f"Date: {started}  "] if started else []),
        f"Machine: {machine()}  ",
        f"Commit: {_commit() if commit is None else commit + ' (when the sweep started)'}  ",
        f"Wall time: {elapsed / 60:.1f} min" + ("" if done else " (in progress: a partial sweep)"),
        "",
        "Each model: `weights=None` (and `weights_backbone=None`), `torch.manual_seed(0)`, eval mode, small "
        "sizes: detectors with `min_size=128, max_size=160` (SSD: its fixed size) and a score threshold of 0 "
        "(random weights score every box low), at most 20 boxes per image; converted by "
        "`resify.apply(model, example, preserve_output=True)` on a list of two images of different sizes "
        "(detection), a 2×3×64×80 batch (segmentation), a 1×3×4×32×32 clip (video; s3d and MViT 16×224×224, "
        "Swin3D 8×64×64). *root*: whether the root's forward traced, else the model is converted in the "
        "modules that do (*kept whole*: the modules whose own forward is left as it is). *owners' prefix*: "
        "the longest common dotted prefix of the sites' owners (— where no site); *sites by module*: the sites "
        "per top-level module of their owners. *outputs equal*: eval mode, "
        "the example and an input of other sizes (three other images; another batch and size), every output "
        f"tensor `assert_close(rtol={RTOL:g}, atol={ATOL:g})`; *max abs*: the largest difference. *train*: both "
        "in train mode from the same random state (detectors with targets): the same loss keys and values "
        "(the same output shapes), and backward gives every resify parameter a gradient. *convert s*: "
        "`resify.apply`; *sec*: the whole row.",
        "",
        "| model | task | params (M) | converts | root | kept whole | sites | owners' prefix | sites by module "
        "| outputs equal | max abs | train | convert s | sec |",
        "|---|---|---:|---|---|---:|---:|---|---|---|---:|---|---:|---:|",
    ]
    for r in rows:
        converts = "yes" if r["status"] in ("passed", "failed") else r["status"]
        prefix = "—" if r["prefix"] is None or not r["sites"] else (r["prefix"] or "(root)")
        max_abs = "" if r["max_abs"] is None else f"{r['max_abs']:.1e}"
        convert_s = "" if r["convert_s"] is None else f"{r['convert_s']:.1f}"
        cells = [
            r["model"],
            r["task"],
            f"{r['params'] / 1e6:.1f}",
            converts,
            r["root"] or "",
            str(len(r["whole"])) if r["root"] else "",
            "" if r["sites"] is None else str(r["sites"]),
            prefix,
            ", ".join(f"{m} {n}" for m, n in r["by_module"].items()),
            r["eval"] or "",
            max_abs,
            r["train"] or "",
            convert_s,
            f"{r['seconds']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("passed", "failed", "refused", "crashed")}
    lines += [
        "",
        f"**{len(rows)} models: {counts['passed']} passed, {counts['failed']} failed a check, "
        f"{counts['refused']} refused, {counts['crashed']} crashed.**",
    ]
    bad = [r for r in rows if r["status"] != "passed"]
    if bad:
        lines += ["", "## Failures", ""]
        lines += [f"- {r['model']} ({r['status']}): {_md(r['message'])}" for r in bad]
    owners = [r for r in rows if r["owners"]]
    if owners:
        lines += ["", "## The sites' owners", ""]
        lines += [f"- {r['model']}: " + ", ".join(_code(o) for o in r["owners"]) for r in owners]
    whole = [r for r in rows if r["whole"]]
    if whole:
        lines += ["", "## Kept whole", ""]
        lines += [
            f"- {r['model']}: "
            + ", ".join(f"{_code(m)} ({c})" for m, c in r["whole"][:12])
            + (f", … ({len(r['whole'])} in all)" if len(r["whole"]) > 12 else "")
            for r in whole
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model names (default: every detection, segmentation, video model)")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="which tasks (default: all)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "tasks.md",
        help="the Markdown results file (default: benchmarks/results/tasks.md)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: steadier on a machine others share)"
    )
    parser.add_argument("--traceback", action="store_true", help="print the tracebacks of failures")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models or names_of(args.tasks)
    command = "python -m benchmarks.tasks" + "".join(f" {a}" for a in sys.argv[1:])
    print(
        f"{len(names)} models; torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    rows = []
    started, commit = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), _commit()
    t0 = time.perf_counter()
    for name in names:
        row = check_task(name, show_traceback=args.traceback)
        rows.append(row)
        print(
            f"{name:38} {row['status']:8} sites={row['sites']} prefix={row['prefix']!r} root={row['root']} "
            f"eval={row['eval']} train={row['train']} {row['seconds']:.1f}s {row['message']}",
            flush=True,
        )
        write_markdown(args.out, rows, command, time.perf_counter() - t0, done=False, started=started, commit=commit)
    elapsed = time.perf_counter() - t0
    write_markdown(args.out, rows, command, elapsed, done=True, started=started, commit=commit)
    bad = sum(r["status"] != "passed" for r in rows)
    print(f"\n{len(rows)} models in {elapsed / 60:.1f} min, {bad} not passing. Written to {args.out}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
