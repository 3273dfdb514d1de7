"""The public entry points: ``apply`` and ``plan``, each running trace → analyze → plan (→ rewrite)."""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from .analysis.analyze import analyze
from .errors import PlanError, ResifyWarning, RewriteError
from .planning.gating import choose_gates
from .planning.owners import merge, place, settle
from .planning.patterns import check_patterns
from .planning.plan_files import read_plan
from .planning.planner import make_plan, reconcile_modes
from .planning.policy import Policy
from .planning.sites import Plan
from .rewriting.install import install
from .rewriting.rewrite import rewrite
from .tracing.calls import Call
from .tracing.inputs import as_inputs
from .tracing.trace import Traced, trace
from .tracing.units import trace_units

__all__ = ["apply", "plan", "converted", "Converted"]


class _GcPause:
    """Pauses the cyclic garbage collector while any conversion runs, in any thread.

    Graph surgery allocates many small objects that are all still alive: the collector only burns
    time (a third of a 10,000-layer apply). ``gc.disable`` is process-wide, so the pauses of
    concurrent conversions are counted: the first one in turns the collector off, the last one out
    turns it back on, and only if it was on when the first one came in.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._was_enabled = False

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._was_enabled = gc.isenabled()
                gc.disable()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0 and self._was_enabled:
                    gc.enable()


_no_gc = _GcPause()

M = TypeVar("M", bound=nn.Module)


@dataclass
class _Prepared:
    plan: Plan
    policy: Policy
    inputs: tuple[Any, ...]  # given or derived
    kwargs: dict[str, Any]
    root: Traced | None  # the whole model's trace, where its forward traced
    calls: dict[str, Call]  # what each module received in the example run (where one was needed)


def _prepare(
    model: nn.Module,
    example_input: Any,
    example_kwargs: dict[str, Any] | None,
    policy: dict[str, Any],
    *,
    named: bool = True,
) -> _Prepared:
    """Trace the model (whole, or the modules inside it that trace), analyse and plan each unit.

    ``named``: name each site under its owner (the result keeps the user's modules); otherwise
    names unique in the whole model (one GraphModule)."""
    pol = Policy.from_kwargs(**policy)
    inputs = as_inputs(example_input)
    kwargs = dict(example_kwargs or {})
    units, whole, calls = trace_units(model, inputs, kwargs, pol.leaf_modules)
    params = sum(p.numel() for p in model.parameters())
    parts = []
    for unit in units:
        analysis = analyze(unit.traced)
        part = make_plan(analysis, pol, params_before=params, prefix=unit.path)
        other = unit.traced.other_mode()
        if other is not None:  # forward reads self.training: plan both graphs, keep what they share
            theirs = make_plan(analyze(other), pol, params_before=params, prefix=unit.path)
            part = reconcile_modes(part, theirs, unit.traced.training)
        part = choose_gates(part, unit.traced, analysis)  # gate='auto': measured on the example's forward
        parts.append(place(part, analysis, unit.path))
    the_plan = merge(type(model).__name__, parts, whole, pol, params)
    if whole:
        check_patterns(the_plan.layers, pol)
    if named:
        the_plan = settle(the_plan, model)
    root = units[0].traced if units[0].path == "" else None
    given = root.example_inputs if root is not None else inputs
    assert given is not None  # units below the root exist only where the example input was given
    return _Prepared(the_plan, pol, tuple(given), kwargs, root, calls)


def plan(
    model: nn.Module, example_input: Any = None, *, example_kwargs: dict[str, Any] | None = None, **policy: Any
) -> Plan:
    """Say what ``apply`` would do to ``model``, and why, without changing anything.

    Args:
        model: any ``nn.Module`` (never modified: not a weight, not ``.training``, not a hook).
        example_input: a tensor or tuple of tensors, one per positional input of ``forward``;
            when omitted and the first layer is an ``nn.Linear``, ``torch.randn(2, in_features)``
            on the model's device. It must be on the device of the model's parameters.
        example_kwargs: inputs given by name (``{"attention_mask": mask}``); every other optional
            argument of ``forward`` is traced at its default and stays optional (passing another
            value to the converted model raises, it is never silently ignored).
        **policy: the keywords of :class:`~resify.Policy`:

            * ``shortcut``: ``'auto'`` (default; identity where the span keeps its shape, else a
              learned projection: an ``nn.Linear``, or a 1×1 conv with the span's stride, with a
              BatchNorm where the span has one, and an average pool where the span pools),
              ``'identity'`` (only where shapes match; other spans are skipped) or ``'dense'``
              (DenseNet-style ``cat([x, F(x)])``; the layer that consumes it is widened, its new
              weights starting at zero, so the model still computes the original function).
            * ``group``: layers per shortcut, an int ≥ 1 (default 1).
            * ``include`` / ``exclude``: glob patterns (a string or a list) on the layers'
              qualified module names, e.g. ``exclude="classifier.*"``; an ``include`` that matches
              no layer raises PlanError.
            * ``gate``: ``'auto'`` (default: chosen site by site from the branch and a forward of
              the example, see :mod:`resify.planning.gating`; each site's ``gate`` and ``gate_reason`` say
              what was built and why), ``None`` (exactly ``x + F(x)``), ``'rezero'``
              (``x + α·F(x)``, one learnable scalar per site) or ``'layerscale'`` (a learnable γ per
              channel); the gate scales the layer branch, never the shortcut. ``'rezero'`` and
              ``'layerscale'`` not with ``shortcut='dense'``.
            * ``gate_init``: the gate's initial value (default 0 for rezero and the gates auto
              chooses, 1e-4 for layerscale); not with ``gate=None``.
            * ``leaf_modules``: module types or glob patterns on qualified names that the tracer
              keeps whole instead of tracing through (e.g. code it cannot follow).
            * ``preserve_output``: ``True`` multiplies every shortcut by a learnable β that starts
              at 0 (and starts the gate at 1), so the converted model computes exactly what
              ``model`` does until training moves β (default ``False``).
            * ``dense_max_growth``: with ``shortcut='dense'``, at most this many channels or
              features added to one widened layer (default: no bound).
            * ``projection``: where shapes change, ``'auto'`` (default: a learned 1×1, grouped
              beside grouped convolutions, parameter-free past the two limits below), ``'conv'``
              (learned only; a span past a limit is skipped) or ``'pad'`` (parameter-free: the
              channels zero-padded or sliced, ResNet's option A).
            * ``max_added``: the learned projections' budget, a share of the model's parameters
              (default 0.1; at least 65,536 parameters); ``None`` for no budget.
            * ``projection_cost``: the largest learned projection, a multiple of the parameters of
              the span it bridges (default 1.0); ``None`` for no limit.

            There is no keyword to pick the tracer: symbolic tracing is tried first and the
            concrete tracer (specialised on the example input, with a ResifyWarning) is the
            fallback; ``Plan.tracer`` says which one was used.

    Returns:
        A frozen :class:`~resify.Plan`: ``sites`` (the shortcuts to add), ``skipped`` (candidate
        spans left out, each with a ``code`` and a ``reason``), ``existing`` (shortcuts the model
        already has) and ``tracer``; ``print(plan)`` shows it as a table.

    Raises:
        TraceError: the model could not be traced, or it rejected the example input.
        PlanError: an unknown keyword or an invalid value (the message lists what is allowed).

    >>> import torch
    >>> from torch import nn
    >>> import resify
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> x = torch.randn(3, 4)
    >>> p = resify.plan(model, x)
    >>> [(s.start, s.kind, s.added_params) for s in p.sites], [s.start for s in p.skipped], p.tracer
    ([('0', 'projection', 40), ('2', 'identity', 0)], ['4'], 'symbolic')
    >>> [(s.start, s.kind) for s in resify.plan(model, x, shortcut="identity").sites]
    [('2', 'identity')]
    >>> [(s.start, s.gate, s.gate_init) for s in resify.plan(model, x, gate="rezero", exclude="0").sites]
    [('2', 'rezero', 0.0)]
    """
    with _no_gc():
        return _prepare(model, example_input, example_kwargs, policy).plan


def apply(
    model: M,
    example_input: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    graph_module: bool = False,
    plan: Plan | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    **policy: Any,
) -> M:
    """Return a copy of ``model`` with residual shortcuts added (``model`` is not changed).

    Takes the same arguments as :func:`plan` (``example_input``, ``example_kwargs`` and the policy
    keywords ``shortcut``, ``group``, ``include``, ``exclude``, ``gate``, ``gate_init``,
    ``leaf_modules``, ``preserve_output``, ``dense_max_growth``, ``projection``, ``max_added``,
    ``projection_cost``; see there), and raises what it raises. The copy keeps ``model``'s class,
    attributes, methods, hooks and modes; each shortcut is installed in the forward of its owner (the
    smallest module whose forward holds the whole span: ``Site.owner``), and what resify adds lives
    under ``<owner>.resify.<site>``. The plan that was carried out is ``resify.applied_plan(result)``;
    the result's weights are its own (copied when either side is first written).

    Args:
        graph_module: return one ``torch.fx.GraphModule`` of the whole model instead (a
            :class:`~resify.DualGraphModule` where ``forward`` reads ``self.training`` and the two
            modes trace to different graphs), with resify's modules under ``result.resify`` and the
            example input in ``result.meta["resify_example_inputs"]``; it needs a model whose forward
            traces whole.
        plan: a saved plan to carry out exactly, instead of planning (a ``Plan``, its dict, a plan
            JSON file, or a folder ``resify.save`` wrote); no policy keywords go with it.

    Returns:
        A copy of ``model``, of its class, in ``model``'s mode (with ``graph_module=True``, the
        GraphModule).

    >>> import torch
    >>> from torch import nn
    >>> import resify
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> x = torch.randn(3, 4)
    >>> converted = resify.apply(model, x)
    >>> [s.start for s in resify.applied_plan(converted).sites], tuple(converted(x).shape)
    (['0', '2'], (3, 2))
    >>> identity = resify.apply(model, x, shortcut="identity")  # one shortcut, around layer '2'
    >>> h = torch.relu(model[0](x))
    >>> torch.allclose(identity(x), model[4](torch.relu(model[2](h)) + h))
    True
    >>> kept = resify.apply(model, x, preserve_output=True)  # shortcuts start at β = 0
    >>> torch.allclose(kept(x), model(x))
    True
    """
    done = converted(model, example_input, example_kwargs, graph_module=graph_module, plan=plan, **policy)
    return done.model  # type: ignore[return-value]


def _reapplied(
    model: nn.Module,
    example_input: Any,
    example_kwargs: dict[str, Any] | None,
    plan: Plan | Mapping[str, Any] | str | os.PathLike[str],
    graph_module: bool,
    policy: dict[str, Any],
) -> Converted:
    """Carry out a saved plan exactly, without planning again (whatever today's defaults are)."""
    extra = sorted(k for k in policy if k != "leaf_modules")
    if extra:
        raise PlanError(
            f"plan= carries its own policy, found {', '.join(extra)} as well; drop them, or make a new plan with them"
        )
    if graph_module:
        raise PlanError("plan= re-applies a plan inside the model's own modules; drop graph_module=True")
    the_plan = read_plan(plan)
    if the_plan.model_class != type(model).__name__:
        raise PlanError(
            f"the plan was made for a {the_plan.model_class}, found a {type(model).__name__}; "
            "pass the model the plan was made for"
        )
    inputs = as_inputs(example_input)
    kwargs = dict(example_kwargs or {})
    with _no_gc():
        if inputs is None:  # derived as planning derives it (a first Linear or conv layer)
            inputs = trace(
                model, None, example_kwargs=kwargs, leaf_modules=policy.get("leaf_modules", ())
            ).example_inputs
        leaves = tuple(policy.get("leaf_modules", ()))
        result = install(model, the_plan, tuple(inputs), kwargs, leaves, checked=True)
    return Converted(result, the_plan, tuple(inputs), kwargs)


@dataclass
class Converted:
    """What a conversion made: the model, the plan carried out, and the example it was traced on."""

    model: nn.Module
    plan: Plan
    inputs: tuple[Any, ...]  # given or derived
    kwargs: dict[str, Any]


def converted(
    model: nn.Module,
    example_input: Any = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    graph_module: bool = False,
    plan: Plan | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    **policy: Any,
) -> Converted:
    """``apply``, with the example input it used (the CLI and the report need it)."""
    if plan is not None:
        return _reapplied(model, example_input, example_kwargs, plan, graph_module, policy)
    with _no_gc():
        prepared = _prepare(model, example_input, example_kwargs, policy, named=not graph_module)
        if not graph_module:
            leaves = tuple(prepared.policy.leaf_modules)
            graph = prepared.root.graph if prepared.root is not None else None
            result = install(model, prepared.plan, prepared.inputs, prepared.kwargs, leaves, prepared.calls, graph)
            return Converted(result, prepared.plan, prepared.inputs, prepared.kwargs)
        if prepared.root is None:
            raise RewriteError(
                f"graph_module=True needs a model whose forward traces whole, and {type(model).__name__}'s does "
                f"not ({prepared.plan.whole[0].reason}); drop graph_module=True to convert it module by module"
            )
        if prepared.root.specialised:  # the result is this graph: it holds only for such inputs
            warnings.warn(prepared.root.specialised, ResifyWarning, stacklevel=3)
        gm = rewrite(prepared.root, prepared.plan)
    gm.meta["resify_example_inputs"] = prepared.root.example_inputs
    gm.meta["resify_example_kwargs"] = prepared.root.example_kwargs
    return Converted(gm, prepared.plan, prepared.root.example_inputs, prepared.root.example_kwargs)
