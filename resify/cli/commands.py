"""The command line: ``resify inspect`` and ``resify convert``, a thin click shell over the library.

Every ResifyError becomes a one-line message and an exit status: 2 for bad input (usage errors,
checked here before the library is called; a model spec that does not load; an example input
that is missing or does not fit the forward), 1 for the job failing; anything else is a bug in
resify and shows its traceback. A traceback for ResifyError too with ``--debug`` (before or after
the subcommand). Text output fits the terminal's width (100 columns where there is none).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import textwrap
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, ParamSpec, TextIO, TypeVar

import click
import torch

from .. import __version__, api
from ..errors import InputError, ModelLoadError, ResifyError, ResifyWarning
from ..planning.policy import Policy, keyword
from ..planning.sites import Plan
from ..views.cells import terminal_width
from .flags import POLICY_FLAG_NAMES, advice_text, policy_from_flags, policy_options
from .loading import MODEL_SPEC_FORMS, LoadedModel, load_model, parse_input_kwarg, parse_input_shape, parse_input_shapes

__all__ = ["main", "cli"]

INSPECT_SCHEMA_VERSION = 1

F = TypeVar("F", bound=Callable[..., Any])
P = ParamSpec("P")
R = TypeVar("R")

#: --gate's choices: the library's GATE_POLICIES, with None ("no gate") spelt "none".
_DEBUG = "resify.debug"  # key in click's ctx.meta, which a group and its subcommand share


class _Failure(click.ClickException):
    """A failure of the job itself: exit status 1, one line."""

    exit_code = 1


class _BadInput(click.ClickException):
    """A problem with what the user asked for (the model spec, the example input): exit status 2."""

    exit_code = 2


def _with_model_spec_help(f: F) -> F:
    """Append what a MODEL_SPEC may be (from loading.MODEL_SPEC_FORMS) to a command's help."""
    width = max(map(len, MODEL_SPEC_FORMS))
    forms = "\n".join(
        textwrap.fill(meaning, 76, initial_indent=f"{form:<{width}}  ", subsequent_indent=" " * (width + 2))
        for form, meaning in MODEL_SPEC_FORMS.items()
    )
    f.__doc__ = (
        f"{(f.__doc__ or '').rstrip()}\n\nMODEL_SPEC is one of:\n\n\b\n{forms}\n\n"
        "Loading a file runs its Python code, as `python model.py` would."
    )
    return f


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[_DEBUG] = True


def _debug_option(f: F) -> F:
    """--debug, accepted before the subcommand (on the group) and after it (on each command)."""
    return click.option(
        "--debug", is_flag=True, expose_value=False, callback=_set_debug, help="Show tracebacks of resify's errors."
    )(f)


def _optional(reason: str, plan: Plan) -> str:
    growth = 100 * plan.added_params / plan.params_before if plan.params_before else 0.0
    return (
        f"the original's gradient flow is already healthy ({reason}): shortcuts are optional here; this plan "
        f"would add {len(plan.sites)} shortcut(s) and {plan.added_params:,} parameters (+{growth:.2f}%)"
    )


def _stdout_gone() -> NoReturn:
    """The reader of stdout went away (``resify inspect … | head -1``): stop quietly, exit status 1.

    As the Python docs advise (signal.SIGPIPE notes), stdout is pointed at devnull first, so that
    the flush at exit does not raise BrokenPipeError a second time.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (CliRunner): nothing to redirect
        pass
    sys.exit(1)


def _boundary(f: Callable[P, R]) -> Callable[P, R]:
    """Turn resify's errors into one-line click errors (tracebacks only with --debug)."""

    @functools.wraps(f)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", ResifyWarning)
                warnings.showwarning = _show_warning
                return f(*args, **kwargs)
        except BrokenPipeError:
            _stdout_gone()
        except ResifyError as e:
            if click.get_current_context().meta.get(_DEBUG, False):
                raise
            if isinstance(e, (ModelLoadError, InputError)):
                raise _BadInput(str(e)) from e
            raise _Failure(str(e)) from e

    return wrapper


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    click.echo(f"warning: {message}", err=True)


def _load(spec: str, opts: dict[str, Any]) -> tuple[LoadedModel, Any, dict[str, Any]]:
    loaded = load_model(spec)
    given = parse_input_shapes(opts["input_shapes"], opts["dtype"])
    example = given if given is not None else loaded.example_input
    if isinstance(example, torch.Tensor) and given is None and opts["dtype"] != "float32":
        example = parse_input_shape(",".join(map(str, example.shape)), opts["dtype"])
    kwargs = dict(loaded.example_kwargs or {})
    kwargs.update(parse_input_kwarg(text) for text in opts["input_kwargs"])
    return loaded, example, kwargs


def _writing(what: str, path: str | Path, write: Callable[[], Any]) -> Any:
    """Run ``write``; an OSError there is about the user's output path, so it becomes a ResifyError."""
    try:
        return write()
    except OSError as e:
        raise ResifyError(f"cannot write {what} to '{path}': {e.strerror or e}; choose a writable path") from e


def _model_info(loaded: LoadedModel, done: api.Converted) -> dict[str, Any]:
    plan = done.plan
    return {
        "source": loaded.source,
        "class": type(loaded.model).__name__,
        "parameters": plan.params_before,
        "parameters_after": sum(p.numel() for p in done.model.parameters()),
        "tracer": plan.tracer,
        "layers": plan.n_layers,
        "example_input": [list(t.shape) for t in done.inputs if isinstance(t, torch.Tensor)],
    }


def _advised(flow: Any, policy: Policy) -> Any:
    """The comparison with each report's advice in flags, leaving out what this run already uses."""
    return replace(
        flow,
        before=replace(flow.before, recommendation=advice_text(flow.before, policy)),
        after=replace(flow.after, recommendation=advice_text(flow.after, policy)),
    )


def _flow(loaded: LoadedModel, done: api.Converted, batches: int) -> Any:
    from ..report import compare, gradient_flow

    inputs, kwargs = done.inputs, done.kwargs
    x = inputs[0] if len(inputs) == 1 else tuple(inputs)
    return compare(
        gradient_flow(loaded.model, x, batches=batches, example_kwargs=kwargs),
        gradient_flow(done.model, x, batches=batches, example_kwargs=kwargs),
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="resify")
@_debug_option
@_with_model_spec_help
def cli() -> None:
    """Add residual shortcuts to a PyTorch model and show the gradient flow before and after."""


@cli.command()
@click.argument("model_spec")
@policy_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "markdown", "json"]),
    default="text",
    show_default=True,
    help=f"text for a terminal, markdown for an issue or a pull request, json (schema_version "
    f"{INSPECT_SCHEMA_VERSION}) for a script.",
)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write the before/after figure (.png/.svg).")
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False),
    help="Write one self-contained page: the model, its architecture diagram, the plan and the gradient flow.",
)
@click.option("--batches", type=click.IntRange(min=1), default=1, show_default=True, help="Batches for the report.")
@click.option("--no-report", is_flag=True, help="Skip the gradient-flow report.")
@click.option(
    "--plan",
    "plan_path",
    type=click.Path(exists=True),
    help="Show what a saved plan (its JSON, or a folder resify.save wrote) does to the model, instead of planning "
    "anew; the policy flags do not go with it.",
)
@_debug_option
@_boundary
@_with_model_spec_help
def inspect(
    model_spec: str,
    fmt: str,
    plot_path: str | None,
    html_path: str | None,
    batches: int,
    no_report: bool,
    plan_path: str | None,
    **opts: Any,
) -> None:
    """A dry run: what resify sees, what it would do, and the gradient flow before and after."""
    policy = policy_from_flags(opts)
    loaded, example, kwargs = _load(model_spec, opts)
    if plan_path is not None:
        ctx = click.get_current_context()
        given = [
            keyword(name).option
            for name in opts
            if name in POLICY_FLAG_NAMES and ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
        ]
        if given:
            raise click.UsageError(f"--plan carries its own policy; drop {', '.join(given)}", ctx=ctx)
        leaves = {"leaf_modules": policy["leaf_modules"]} if policy.get("leaf_modules") else {}
        done = api.converted(loaded.model, example, kwargs, plan=plan_path, **leaves)
    else:
        done = api.converted(loaded.model, example, kwargs, **policy)
    plan = done.plan
    info = _model_info(loaded, done)
    flow = None if no_report else _flow(loaded, done, batches)
    flow = None if flow is None else _advised(flow, plan.policy)
    if flow is not None and flow.before.verdict == "healthy" and plan.sites:
        plan = replace(plan, notes=(*plan.notes, _optional(flow.before.reason, plan)))
    if plot_path and flow is not None:
        _writing("the plot", plot_path, lambda: flow.plot(plot_path))
    if html_path:
        from ..views.html import report_page

        page = report_page({**info, "resify_version": __version__}, plan, flow)
        _writing("the page", html_path, lambda: Path(html_path).write_text(page, encoding="utf-8"))
    if fmt == "json":
        doc = {
            "schema_version": INSPECT_SCHEMA_VERSION,
            "model": info,
            "plan": plan.to_dict(),
            "report": None if flow is None else json.loads(flow.to_json()),
        }
        click.echo(json.dumps(doc, indent=2))
        return
    md, width = fmt == "markdown", terminal_width()
    click.echo(("# " if md else "") + f"{info['class']} ({info['source']})")
    click.echo(
        f"{info['parameters']:,} parameters, {info['layers']} layers, {info['tracer']} trace, "
        f"example input {info['example_input']}"
    )
    click.echo("")
    click.echo(f"```\n{plan}\n```" if md else plan.to_text(width))
    if flow is not None:
        click.echo("")
        click.echo(flow.to_markdown() if md else flow.to_text(width))
    written = [f"plot written to {plot_path}"] if plot_path and flow is not None else []
    written += [f"page written to {html_path}"] if html_path else []
    if written:
        click.echo("\n" + "\n".join(written))


@cli.command()
@click.argument("model_spec")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="Folder to write.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@policy_options
@click.option("--batches", type=click.IntRange(min=1), default=1, show_default=True, help="Batches for the report.")
@_debug_option
@_boundary
@_with_model_spec_help
def convert(model_spec: str, out: str, force: bool, batches: int, **opts: Any) -> None:
    """Write the converted model to OUT: model.py, weights.pt, plan.json, report.json."""
    from .export import load_line, save

    policy = policy_from_flags(opts)
    loaded, example, kwargs = _load(model_spec, opts)
    done = api.converted(loaded.model, example, kwargs, graph_module=True, **policy)
    converted, plan, inputs, kw = done.model, done.plan, done.inputs, done.kwargs
    flow = _advised(_flow(loaded, done, batches), plan.policy)

    def same_outputs(reloaded: torch.nn.Module) -> None:
        with torch.no_grad():
            converted.eval(), reloaded.eval()
            a, b = converted(*inputs, **kw), reloaded(*inputs, **kw)
        converted.train(plan_training), reloaded.train(plan_training)
        if isinstance(a, torch.Tensor) and not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
            raise ResifyError("the written model does not reproduce the converted one; please report this")

    assert isinstance(converted, torch.fx.GraphModule)  # graph_module=True: the whole model's graph

    def write() -> None:
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

    plan_training = converted.training
    _writing("the converted model", out, write)
    click.echo(plan.summary())
    click.echo(f"wrote {out}/model.py, weights.pt, plan.json, report.json; load it with:")
    click.echo(load_line(out))


def main() -> None:
    """Console-script entry point."""
    try:
        try:
            cli(prog_name="resify")
        finally:
            sys.stdout.flush()  # output still buffered goes now, while a closed pipe can be handled
    except BrokenPipeError:
        _stdout_gone()


if __name__ == "__main__":  # pragma: no cover
    main()
