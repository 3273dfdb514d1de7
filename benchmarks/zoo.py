"""Sweep resify over every torchvision classification model (weights=None): one row per model.

    .venv/bin/python -m benchmarks.zoo                    # the whole zoo
    .venv/bin/python -m benchmarks.zoo resnet18 vgg11      # some models
    .venv/bin/python -m benchmarks.zoo --preserve-output   # also check outputs are unchanged
    python -m benchmarks.zoo --device cuda --preserve-output   # the same with the models on a GPU

Each model is either converted (same output shape, backward reaches every parameter that the
original's backward reaches, and every added one; every parameter and buffer lies on the model's
device; the shapes resify found without computing equal a real run's at every node) or refused with
a ResifyError and its reason.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import warnings

import torch

import resify
from resify.constants import NAMESPACE, image_size


def shape_mismatches(model: torch.nn.Module, x: torch.Tensor) -> tuple[str, list[str]]:
    """How resify found the shapes ("meta" or "run"), and the nodes where a real run disagrees."""
    from resify.tracing.shapes import ShapeRecorder
    from resify.tracing.trace import trace

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = trace(model, x)
    found = {n.name: n.meta.get("resify") for n in traced.graph.nodes}
    if traced.shapes_from == "meta":
        with torch.no_grad():
            ShapeRecorder(traced.root, graph=traced.graph).run(x)  # overwrites them with a real run's
    return traced.shapes_from, [n.name for n in traced.graph.nodes if n.meta.get("resify") != found[n.name]]


def check_model(name: str, preserve_output: bool = False, device: str = "cpu", **policy) -> dict:
    """Convert one torchvision model on ``device`` and check it; returns a row for the table."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval().to(device)
    x = torch.randn(1, 3, image_size(name), image_size(name)).to(device)
    row = {"model": name, "params": sum(p.numel() for p in model.parameters())}
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if preserve_output:
                policy["preserve_output"] = True
            converted = resify.apply(model, x, **policy)
    except resify.ResifyError as e:
        row.update(status="refused", reason=str(e))
        return row
    row["seconds"] = time.perf_counter() - t0
    plan = resify.applied_plan(converted)
    counts = plan.counts()
    row.update(
        status="converted",
        plan=plan,
        sites=len(plan.sites),
        identity=counts.get("identity", 0),
        projection=counts.get("projection", 0),
        dense=counts.get("dense", 0),
        existing=len(plan.existing),
        added=plan.added_params,
    )
    out0 = model(x)
    out0 = out0 if isinstance(out0, torch.Tensor) else out0[0]
    out0.sum().backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None}
    out = converted(x)
    out = out if isinstance(out, torch.Tensor) else out[0]
    row["same_shape"] = out.shape == out0.shape
    if preserve_output:
        rel = (out - out0).abs().max().item() / max(out0.abs().max().item(), 1e-12)
        row["max_rel_diff"] = rel
    out.sum().backward()
    names = dict(converted.named_parameters())
    missing = [n for n in reached if n in names and names[n].grad is None]
    # resify's parameters live under each owner: <owner>.resify.<site>.* (the root's: resify.<site>.*)
    missing += [n for n, p in names.items() if f".{NAMESPACE}." in f".{n}" and p.grad is None]
    row["missing_grads"] = missing
    row["off_device"] = [n for n, t in [*names.items(), *converted.named_buffers()] if t.device != x.device]
    row["shapes_from"], row["shape_mismatches"] = shape_mismatches(model, x)
    row["ok"] = (
        row["same_shape"]
        and not missing
        and not row["shape_mismatches"]
        and not row["off_device"]
        and (not preserve_output or row["max_rel_diff"] <= 1e-5)
    )
    return row


def main() -> int:
    import torchvision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*")
    parser.add_argument("--preserve-output", action="store_true")
    parser.add_argument("--skip", nargs="*", default=[], help="models to leave out (e.g. vit_h_14)")
    parser.add_argument("--device", default="cpu", help="where the models live (cpu, cuda)")
    args = parser.parse_args()
    if args.device != "cpu":
        print(
            f"device: {torch.device(args.device)} ({torch.cuda.get_device_name(args.device)}), torch {torch.__version__}"
        )
    names = args.models or torchvision.models.list_models(torchvision.models)
    names = [n for n in names if n not in args.skip]
    rows = []
    print(f"{'model':28} {'status':9} {'sites':>5} {'id':>4} {'proj':>4} {'exist':>5} {'+params':>12} {'sec':>6}  ok")
    for name in names:
        row = check_model(name, args.preserve_output, args.device)
        rows.append(row)
        if row["status"] == "refused":
            print(f"{name:28} refused   {row['reason']}")
        else:
            extra = f" rel={row['max_rel_diff']:.1e}" if "max_rel_diff" in row else ""
            print(
                f"{name:28} converted {row['sites']:5} {row['identity']:4} {row['projection']:4} "
                f"{row['existing']:5} {row['added']:12,} {row['seconds']:6.2f}  {row['ok']}{extra}"
                f" shapes={row['shapes_from']}"
                + (f" missing={row['missing_grads'][:3]}" if row["missing_grads"] else "")
                + (f" off-device={row['off_device'][:3]}" if row["off_device"] else "")
                + (f" shape-mismatch={row['shape_mismatches'][:3]}" if row["shape_mismatches"] else ""),
                flush=True,
            )
        gc.collect()
    converted = [r for r in rows if r["status"] == "converted"]
    refused = [r for r in rows if r["status"] == "refused"]
    bad = [r["model"] for r in converted if not r["ok"]]
    print(
        f"\n{len(rows)} models: {len(converted)} converted ({len(converted) - len(bad)} checked ok), "
        f"{len(refused)} refused; already residual: {sum(1 for r in converted if r['existing'])}"
    )
    if bad:
        print("FAILED checks:", ", ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
