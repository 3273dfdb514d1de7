"""What the default plan costs on every torchvision classification model (weights=None).

    .venv/bin/python -m benchmarks.plan_costs                  # the table, default policy
    .venv/bin/python -m benchmarks.plan_costs --baseline       # also the plans of the seed-literal
                                                               # policy (no budget, no cost rule)
    .venv/bin/python -m benchmarks.plan_costs --gain vgg16 alexnet   # + first-layer gradient gain

One row per model: sites by kind, added parameters (share of the model's), the largest single
shortcut, and the number of candidates the budget or the cost rule left out. ``--gain`` measures
``resify.compare(gradient_flow(model), gradient_flow(converted)).first_layer_ratio`` (batch 2, eval
mode) under both policies. Results: ``benchmarks/results/plan-costs.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch

import resify
from resify.constants import image_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the seed-literal plan: a projection wherever shapes change, whatever it costs
BASELINE = {"max_added": None, "projection_cost": None, "projection": "conv"}


def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    side = image_size(name)
    return model, torch.randn(1, 3, side, side)


def plan_row(name: str, model: torch.nn.Module, x: torch.Tensor, **policy) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = resify.plan(model, x, **policy)
    largest = max(plan.sites, key=lambda s: s.added_params, default=None)
    return {
        "model": name,
        "params": plan.params_before,
        "sites": len(plan.sites),
        "kinds": plan.counts(),
        "added": plan.added_params,
        "share": plan.added_params / plan.params_before,
        "largest": (f"{largest.start}: {largest.projection or 'identity'}", largest.added_params) if largest else None,
        # projections past the budget or the cost rule: parameter-free instead (a note each)
        "parameter_free": sum("a parameter-free shortcut" in note for note in plan.notes),
    }


def gain(model: torch.nn.Module, x: torch.Tensor, **policy) -> tuple[float | None, str]:
    """The first-layer gain (mean |grad| after ÷ before) and the verdicts before → after."""
    torch.manual_seed(1)
    x = torch.cat([x, torch.randn_like(x)])  # batch 2: BatchNorm in train mode would need it too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = resify.apply(model, x, **policy)
        before, after = resify.gradient_flow(model, x), resify.gradient_flow(converted, x)
    return resify.compare(before, after).first_layer_ratio, f"{before.verdict} → {after.verdict}"


def main(argv: list[str] | None = None) -> int:
    import torchvision

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", help="model names (default: every classification model)")
    p.add_argument("--baseline", action="store_true", help="also plan with the seed-literal policy")
    p.add_argument("--gain", nargs="*", default=[], metavar="MODEL", help="measure the first-layer gain")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results", "plan-costs.md"))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    names = args.models or sorted(torchvision.models.list_models(module=torchvision.models))
    t0 = time.perf_counter()
    rows, base = [], {}
    for name in names:
        model, x = _model(name)
        rows.append(plan_row(name, model, x))
        if args.baseline:
            base[name] = plan_row(name, model, x, **BASELINE)
        r = rows[-1]
        print(f"{name:28s} {r['sites']:4d} sites  +{100 * r['share']:6.2f}%", flush=True)
        del model
    gains = {}
    for name in args.gain:
        model, x = _model(name)
        gains[name] = (gain(model, x, **BASELINE), gain(model, x))
        print(f"{name}: first-layer gain {gains[name][0]} (seed-literal) -> {gains[name][1]}", flush=True)
    minutes = (time.perf_counter() - t0) / 60
    text = _markdown(rows, base, gains, sys.argv[1:] if argv is None else argv, minutes)
    print(text)
    if not args.no_write:
        with open(args.results, "w") as f:
            f.write(text)
        with open(args.results.replace(".md", ".json"), "w") as f:
            json.dump({"rows": rows, "baseline": base, "gains": gains}, f, indent=1)
    return 0


def _summary(rows: list[dict]) -> str:
    shares = [100 * r["share"] for r in rows]
    worst = max(rows, key=lambda r: r["share"])
    return (
        f"median +{statistics.median(shares):.2f}%, worst +{100 * worst['share']:.2f}% ({worst['model']}), "
        f"median {statistics.median(r['sites'] for r in rows):.0f} sites"
    )


def _markdown(rows: list[dict], base: dict, gains: dict, argv: list[str] | None, minutes: float) -> str:
    command = "python -m benchmarks.plan_costs" + (" " + " ".join(argv) if argv else "")
    lines = [
        "# What the default plan costs: torchvision classification models",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"resify {resify.__version__}; {minutes:.1f} min. `resify.plan(model, torch.randn(1, 3, S, S))`, "
        "S = 299 for Inception, else 224; weights=None.",
        "",
        f"Default policy: {_summary(rows)}.",
    ]
    if base:
        lines.append(f"Seed-literal policy (`{BASELINE}`): {_summary(list(base.values()))}.")
    if gains:
        lines += [
            "",
            "First-layer gradient gain at initialisation: `resify.compare(gradient_flow(model, x), "
            "gradient_flow(converted, x)).first_layer_ratio`, batch 2, eval mode.",
            "",
            "| model | gain, seed-literal | verdict | gain, default | verdict | default / seed-literal |",
            "|---|---|---|---|---|---|",
        ]
        for name, ((old, old_v), (new, new_v)) in gains.items():
            lines.append(f"| {name} | {old:.3g}× | {old_v} | {new:.3g}× | {new_v} | {new / old:.2f} |")
    head = "| model | params | sites | kinds | added | largest shortcut | parameter-free in place of a learned one |"
    lines += ["", head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(r["kinds"].items())) or "-"
        largest = f"`{r['largest'][0]}` ({r['largest'][1]:,})" if r["largest"] else "-"
        old = f" (seed-literal: +{100 * base[r['model']]['share']:.1f}%)" if r["model"] in base else ""
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['sites']} | {kinds} | +{100 * r['share']:.2f}%{old} | "
            f"{largest} | {r['parameter_free']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
