"""The command line: ``resify inspect`` and ``resify convert``, a thin click shell over the library.

Every ResifyError becomes a one-line message and exit status 1 (2 for usage errors); a traceback
only with ``--debug``.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from collections.abc import Callable
from typing import Any

import click
import torch

from . import __version__
from .api import apply
from .errors import ModelLoadError, ResifyError, ResifyWarning
from .loading import DTYPES, LoadedModel, load_model, parse_input_kwarg, parse_input_shape

__all__ = ["main", "cli"]

INSPECT_SCHEMA_VERSION = 1


class _Failure(click.ClickException):
    """A failure of the job itself: exit status 1, one line."""

    exit_code = 1


class _BadInput(click.ClickException):
    """A problem with what the user asked for (the model spec, the input shape): exit status 2."""

    exit_code = 2


def _policy_options(f: Callable) -> Callable:
    """The policy keywords of resify.apply as flags (shared by inspect and convert)."""
    options = [
        click.option("--input-shape", metavar="N,C,H,W", help="Example input shape, e.g. 8,3,32,32."),
        click.option(
            "--dtype",
            type=click.Choice(list(DTYPES)),
            default="float32",
            show_default=True,
            help="dtype of the example input (integer ones: token ids 0 or 1).",
        ),
        click.option(
            "--input-kwarg",
            "input_kwargs",
            multiple=True,
            metavar="NAME=SHAPE[:DTYPE]",
            help="An input passed by name, e.g. attention_mask=2,16:int64 (repeatable); "
            "every other optional argument stays at its default.",
        ),
        click.option(
            "--shortcut",
            type=click.Choice(["auto", "identity", "dense"]),
            default="auto",
            show_default=True,
            help="auto: identity or projection; identity: only where shapes match.",
        ),
        click.option("--group", type=click.IntRange(min=1), default=1, show_default=True, help="Layers per shortcut."),
        click.option("--include", multiple=True, metavar="GLOB", help="Only layers whose name matches (repeatable)."),
        click.option(
            "--exclude", multiple=True, metavar="GLOB", help="Leave out layers whose name matches (repeatable)."
        ),
        click.option(
            "--gate",
            type=click.Choice(["none", "rezero", "layerscale"]),
            default="none",
            show_default=True,
            help="Scale each layer branch by a learnable gate.",
        ),
        click.option("--gate-init", type=float, default=None, help="Initial gate value (rezero 0, layerscale 1e-4)."),
        click.option("--preserve-output", is_flag=True, help="Start every shortcut at β=0: outputs unchanged."),
        click.option(
            "--dense-max-growth",
            type=click.IntRange(min=1),
            default=None,
            help="Dense: at most this many channels/features added per widened layer.",
        ),
        click.option(
            "--leaf",
            "leaf_modules",
            multiple=True,
            metavar="GLOB",
            help="Module names to keep whole while tracing (repeatable).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _policy(opts: dict[str, Any]) -> dict[str, Any]:
    policy: dict[str, Any] = {
        "shortcut": opts["shortcut"],
        "group": opts["group"],
        "include": opts["include"],
        "exclude": opts["exclude"],
        "gate": None if opts["gate"] == "none" else opts["gate"],
        "leaf_modules": opts["leaf_modules"],
    }
    if opts["gate_init"] is not None:
        policy["gate_init"] = opts["gate_init"]
    if opts["preserve_output"]:
        policy["preserve_output"] = True
    if opts["dense_max_growth"] is not None:
        policy["dense_max_growth"] = opts["dense_max_growth"]
    return policy


def _boundary(f: Callable) -> Callable:
    """Turn resify's errors into one-line click errors (tracebacks only with --debug)."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", ResifyWarning)
                warnings.showwarning = _show_warning
                return f(*args, **kwargs)
        except (ResifyError, TypeError, OSError) as e:
            if debug:
                raise
            if isinstance(e, ModelLoadError):
                raise _BadInput(str(e)) from e
            raise _Failure(str(e)) from e

    return wrapper


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


def _load(spec: str, opts: dict[str, Any]) -> tuple[LoadedModel, Any, dict[str, Any]]:
    loaded = load_model(spec)
    given = parse_input_shape(opts["input_shape"], opts["dtype"])
    example = given if given is not None else loaded.example_input
    if isinstance(example, torch.Tensor) and opts["input_shape"] is None and opts["dtype"] != "float32":
        example = parse_input_shape(",".join(map(str, example.shape)), opts["dtype"])
    kwargs = dict(loaded.example_kwargs or {})
    kwargs.update(parse_input_kwarg(text) for text in opts["input_kwargs"])
    return loaded, example, kwargs


def _model_info(loaded: LoadedModel, converted: torch.fx.GraphModule) -> dict[str, Any]:
    plan = converted.meta["resify_plan"]
    return {
        "source": loaded.source,
        "class": type(loaded.model).__name__,
        "parameters": plan.params_before,
        "parameters_after": sum(p.numel() for p in converted.parameters()),
        "tracer": plan.tracer,
        "layers": plan.n_layers,
        "example_input": [
            list(t.shape) for t in converted.meta["resify_example_inputs"] if isinstance(t, torch.Tensor)
        ],
    }


def _flow(loaded: LoadedModel, converted: torch.fx.GraphModule, batches: int) -> Any:
    from .report import compare, gradient_flow

    inputs = converted.meta["resify_example_inputs"]
    kwargs = converted.meta["resify_example_kwargs"]
    x = inputs[0] if len(inputs) == 1 else tuple(inputs)
    return compare(
        gradient_flow(loaded.model, x, batches=batches, example_kwargs=kwargs),
        gradient_flow(converted, x, batches=batches, example_kwargs=kwargs),
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="resify")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def cli(debug: bool) -> None:
    """Add residual shortcuts to a PyTorch model and show the gradient flow before and after.

    MODEL_SPEC is path/to/model.py, path/to/model.py:NAME or torchvision:NAME. Loading a file runs
    its Python code, as `python model.py` would.
    """


@cli.command()
@click.argument("model_spec")
@_policy_options
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "json"]), default="text", show_default=True)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write the before/after figure (.png/.svg).")
@click.option("--batches", type=click.IntRange(min=1), default=1, show_default=True, help="Batches for the report.")
@click.option("--no-report", is_flag=True, help="Skip the gradient-flow report.")
@_boundary
def inspect(model_spec: str, fmt: str, plot_path: str | None, batches: int, no_report: bool, **opts: Any) -> None:
    """A dry run: what resify sees, what it would do, and the gradient flow before and after."""
    loaded, example, kwargs = _load(model_spec, opts)
    converted = apply(loaded.model, example, example_kwargs=kwargs, **_policy(opts))
    plan = converted.meta["resify_plan"]
    info = _model_info(loaded, converted)
    flow = None if no_report else _flow(loaded, converted, batches)
    if plot_path and flow is not None:
        flow.plot(plot_path)
    if fmt == "json":
        doc = {
            "schema_version": INSPECT_SCHEMA_VERSION,
            "model": info,
            "plan": plan.to_dict(),
            "report": None if flow is None else json.loads(flow.to_json()),
        }
        click.echo(json.dumps(doc, indent=2))
        return
    md = fmt == "markdown"
    click.echo(("# " if md else "") + f"{info['class']} ({info['source']})")
    click.echo(
        f"{info['parameters']:,} parameters, {info['layers']} layers, {info['tracer']} trace, "
        f"example input {info['example_input']}"
    )
    click.echo("")
    click.echo(("```\n" if md else "") + str(plan) + ("\n```" if md else ""))
    if flow is not None:
        click.echo("")
        click.echo(flow.to_markdown() if md else flow.to_text())
    if plot_path and flow is not None:
        click.echo(f"\nplot written to {plot_path}")


@cli.command()
@click.argument("model_spec")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@_policy_options
@click.option("--batches", type=click.IntRange(min=1), default=1, show_default=True, help="Batches for the report.")
@_boundary
def convert(model_spec: str, out: str, force: bool, batches: int, **opts: Any) -> None:
    """Write the converted model to OUT: model.py, weights.pt, plan.json, report.json."""
    from .export import load_line, save

    loaded, example, kwargs = _load(model_spec, opts)
    converted = apply(loaded.model, example, example_kwargs=kwargs, **_policy(opts))
    plan = converted.meta["resify_plan"]
    flow = _flow(loaded, converted, batches)
    inputs = converted.meta["resify_example_inputs"]

    def same_outputs(reloaded: torch.nn.Module) -> None:
        with torch.no_grad():
            converted.eval(), reloaded.eval()
            kw = converted.meta["resify_example_kwargs"]
            a, b = converted(*inputs, **kw), reloaded(*inputs, **kw)
        converted.train(plan_training), reloaded.train(plan_training)
        if isinstance(a, torch.Tensor) and not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
            raise ResifyError("the written model does not reproduce the converted one; please report this")

    plan_training = converted.training
    save(
        converted,
        out,
        force=force,
        check=same_outputs,
        extra_json={
            "plan.json": plan.to_dict(),
            "report.json": json.loads(flow.to_json()),
        },
    )
    click.echo(plan.summary())
    click.echo(f"wrote {out}/model.py, weights.pt, plan.json, report.json; load it with:")
    click.echo(load_line(out))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="resify")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
