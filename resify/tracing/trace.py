"""Stage 1 of the pipeline: capture a model as a torch.fx graph with a shape on every node.

``trace`` works on a structural copy of the model's module tree (``copying.py``: the caller's model
is never touched), tries torch.fx symbolic tracing with the standard ``torch.nn`` layers as leaves
and, when that fails on data-dependent control flow (``if x.shape == y.shape``, ``len(x)``,
``int(x.size(0))``), falls back to a tracer that runs the model on the concrete example input and
specialises every such decision on it (both tracers live in ``tracers.py``). It matches the example
inputs to ``forward``'s parameters, and traces the other mode too where forward reads
``self.training``. Shapes of a symbolic graph come from ``shapes.py`` (rules and meta tensors: no
arithmetic, no memory; a real run only when the model needs real values).
It writes one thing: ``node.meta["resify"]``, a :class:`TensorInfo` for each tensor-valued node.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx
from torch import nn

from ..constants import TracerChoice
from ..errors import InputError, ResifyWarning, TraceError
from ..formats import first_line
from ..rewriting.modules import FORWARD_ATTRIBUTE, is_owner, strip_forward
from ..state import state_kept
from .copying import own_containers, structural_copy, without_hooks
from .inputs import as_inputs, check_device, derive_example_input
from .shapes import TensorInfo, node_keys, record_shapes
from .tracers import (
    ConcreteTracer,
    LeafSpec,
    LeafTracer,
    current_module,
    holds_tensor,
    raised_by_user,
    restore_placeholder_names,
    tracing,
    user_frame,
)

__all__ = ["TensorInfo", "Traced", "trace", "LeafSpec"]


@dataclass
class Traced:
    """A traced model: its graph (shapes in ``node.meta["resify"]``) over a private module tree.

    ``root`` is a structural copy of the user's model: new module objects (so attributes set on
    them, such as the tracer's tensor constants, never reach the user's model) that still share
    the user's parameter and buffer tensors until ``rewrite`` gives the result its own.
    """

    root: nn.Module
    graph: torch.fx.Graph
    tracer: TracerChoice  # "symbolic" or "concrete"
    example_inputs: tuple[Any, ...]
    model_class: str
    training: bool
    shapes_from: str = "meta"  # "meta": propagated on storage-less tensors; "run": a real forward pass
    #: the graph of the other mode (eval when ``training``, else train) where ``self.training``
    #: changes what forward does; None where both modes trace to the same graph
    other_graph: torch.fx.Graph | None = None
    #: example inputs given by name (``example_kwargs``); the converted forward takes them by name too
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    #: where the graph specialised on the example (data-dependent control flow): the warning's text
    specialised: str | None = None

    def other_mode(self) -> Traced | None:
        """This trace seen in the other mode (same module tree, the other graph), or None."""
        if self.other_graph is None:
            return None
        return replace(self, graph=self.other_graph, training=not self.training, other_graph=None)


_P = inspect.Parameter


@dataclass
class _Call:
    """How the traced forward is called: the given inputs by position and by name, the rest at
    their defaults (specialised: passing another value to the converted model raises)."""

    forward: Any  # a forward that names exactly what is traced, for a subclass (None: the model's own)
    concrete: dict[str, Any]  # parameters left at their defaults: fx's concrete_args
    values: tuple[Any, ...]  # one value per placeholder, in order (the defaults for concrete ones)


def _call_for(module: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
    """Match the example inputs to ``forward``'s parameters (see :class:`_Call`).

    Raises:
        InputError: a name that forward does not take, an input given twice, or one not given.
    """
    cls = type(module)
    own = _own_forward(module, inputs, kwargs)
    try:
        params = list(inspect.signature(own or cls.forward).parameters.values())[1:]
    except (TypeError, ValueError):  # no signature to read: call it as before
        return _Call(None, {}, inputs)
    kinds = {p.kind for p in params}
    positional = [p for p in params if p.kind in (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)]
    named = positional + [p for p in params if p.kind is _P.KEYWORD_ONLY]
    names = [p.name for p in named]
    var_kw = _P.VAR_KEYWORD in kinds
    where = f"{cls.__name__}.forward({', '.join(str(p) for p in params)})"
    extra = [k for k in kwargs if k not in names]
    if extra and not var_kw:
        raise InputError(
            f"example_kwargs names {', '.join(map(repr, extra))}, which {where} does not take; "
            f"it takes {', '.join(names) or 'no named input'}"
        )
    if len(inputs) > len(positional) and _P.VAR_POSITIONAL not in kinds:
        raise InputError(
            f"example_input has {len(inputs)} inputs but {where} takes {len(positional)} by position; "
            "pass the others by name with example_kwargs"
        )
    given = positional[: len(inputs)]
    twice = [p.name for p in given if p.name in kwargs]
    if twice:
        raise InputError(
            f"{', '.join(map(repr, twice))} given both in example_input and in example_kwargs; give it once"
        )
    rest = [p for p in named if p not in given]
    missing = [p.name for p in rest if p.default is _P.empty and p.name not in kwargs]
    if missing:
        raise InputError(
            f"the model's forward takes an input '{missing[0]}' that example_input does not provide (found "
            f"{len(inputs)} input(s)) in {where}; pass a tuple with one tensor per input, or name it: "
            f"example_kwargs={{'{missing[0]}': ...}} (CLI: one --input-shape per positional input, in order, "
            f"or --input-kwarg {missing[0]}=SHAPE)"
        )
    # left at their defaults, or given as plain values (use_cache=False): specialised, not traced
    concrete = {
        p.name: kwargs.get(p.name, p.default) for p in rest if p.name not in kwargs or not holds_tensor(kwargs[p.name])
    }
    concrete.update({k: v for k, v in kwargs.items() if k in extra and not holds_tensor(v)})
    simple = not kwargs and not (kinds & {_P.VAR_POSITIONAL, _P.VAR_KEYWORD, _P.KEYWORD_ONLY, _P.POSITIONAL_ONLY})
    if simple:
        return _Call(own, concrete, (*inputs, *(concrete[p.name] for p in rest)))
    # a forward with *args, **kwargs or names given out of order: trace a subclass whose forward
    # takes exactly the given inputs, then the rest of the named ones at their defaults
    n_extra_pos = len(inputs) - len(given)
    head = [p.name for p in given] + [f"arg_{i}" for i in range(n_extra_pos)]
    tail = [f"{n}=__defaults[{n!r}]" if n in concrete else n for n in [p.name for p in rest] + extra]
    tail = [t for t in tail if "=" not in t] + [t for t in tail if "=" in t]  # required ones first
    call = [p.name for p in given] + ([f"*({', '.join(head[len(given) :])},)"] if n_extra_pos else [])
    call += [f"{n}={n}" for n in [p.name for p in rest] + extra]
    src = f"def forward(self, {', '.join(head + tail)}):\n    return __forward(self, {', '.join(call)})\n"
    scope: dict[str, Any] = {
        "__forward": own or cls.forward,
        "__defaults": {p.name: p.default for p in rest} | concrete,
    }
    exec(src, scope)
    ordered = [t.split("=")[0] for t in tail]
    by_name = {**{p.name: concrete.get(p.name) for p in rest}, **kwargs, **concrete}
    return _Call(scope["forward"], concrete, (*inputs, *(by_name[n] for n in ordered)))


def _own_forward(module: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The forward resify installed on ``module`` (a converted model converted again), or None:
    torch.fx traces the class's forward, so the instance's is traced through a subclass."""
    if not is_owner(module):
        return None
    return module.__dict__[FORWARD_ATTRIBUTE].function(module, inputs, kwargs)


@contextlib.contextmanager
def _forward_of(module: nn.Module, call: _Call) -> Iterator[None]:
    """Trace through ``call``'s forward (a subclass of the module's class, swapped in for the trace)."""
    if call.forward is None:
        yield
        return
    cls = module.__class__
    module.__class__ = type(cls.__name__, (cls,), {"forward": call.forward, "__module__": cls.__module__})
    try:
        yield
    finally:
        module.__class__ = cls


def _takes(module: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False


def _traced(
    tracer: torch.fx.Tracer, module: nn.Module, call: _Call, reads: list[nn.Module] | None = None
) -> torch.fx.Graph:
    """``tracer``'s graph of ``module`` called as ``call`` says; ``reads`` collects the modules whose
    forward read ``self.training`` meanwhile."""
    with tracing(module, reads), _forward_of(module, call):
        graph = tracer.trace(module, concrete_args=call.concrete or None)
    restore_placeholder_names(graph, call.concrete)
    return graph


def trace(
    model: nn.Module,
    example_input: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    leaf_modules: LeafSpec = (),
    original: bool = False,
    warn: bool = True,
    shapes: bool = True,
) -> Traced:
    """Trace ``model`` into a graph with a TensorInfo on every tensor node.

    Args:
        model: any ``nn.Module``; tracing works on a structural copy and never changes it (buffers
            that a forward on the example input would update are restored).
        example_input: a tensor or tuple of tensors; derived when the first layer fixes it.
        example_kwargs: inputs given by name; every other optional parameter of ``forward`` (and
            ``**kwargs``) is traced at its default and stays optional in the converted model.
        leaf_modules: module types or glob patterns on qualified names to keep whole.
        original: trace the class's forward even where resify installed one on the instance (to
            put shortcuts in it); by default a converted model is traced as it now computes.
        shapes: record a TensorInfo on every node of a symbolic trace (what planning reads); an
            owner traced to put planned sites in reads none, and skips the shape propagation.
        warn: warn (ResifyWarning) where the graph specialised on the example; planning, whose
            graph is not the result's, leaves the warning to the traces of the modules rewritten.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        TraceError: both tracers failed, or the example input was rejected.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"resify expects a torch.nn.Module, found {type(model).__name__}; "
            "pass the model object itself (e.g. resify.apply(MyNet(), x))"
        )
    leaves = list(leaf_modules)
    inputs = as_inputs(example_input)
    kwargs = dict(example_kwargs or {})
    if inputs is not None or kwargs:
        check_device(model, (*(inputs or ()), *kwargs.values()))
    private = structural_copy(model)
    if original:
        strip_forward(private)
    without_hooks(private)  # the user's hooks never see a tracer's proxies (the result keeps them)
    name = type(model).__name__
    call = _call_for(private, inputs if inputs is not None else (None,), kwargs)
    reads: list[nn.Module] = []  # modules whose forward read self.training while traced

    symbolic_error: Exception | None = None
    specialised: str | None = None
    where = module_hint = ""
    tracer_used: TracerChoice = "symbolic"
    shapes_from = "meta"
    try:
        tracer = LeafTracer(leaves)
        graph = _traced(tracer, private, call, reads)
    except TraceError:
        raise
    except Exception as e:  # any failure of symbolic tracing sends us to the concrete tracer
        symbolic_error = e
        where = user_frame(e)
        module_hint = current_module(tracer)

    if symbolic_error is None:
        if inputs is None:
            inputs = derive_example_input(private, _first_called_module(private, graph))
            call = replace(call, values=(*inputs, *call.values[1:]))
        shapes_from = record_shapes(private, graph, call.values) if shapes else "none"
    else:
        if inputs is None:
            try:
                inputs = derive_example_input(private)
            except InputError as e:
                raise InputError(
                    f"symbolic tracing of {name} failed{where}: {first_line(symbolic_error)}; "
                    f"tracing on a concrete input needs one: {e}"
                ) from symbolic_error
            call = replace(call, values=(*inputs, *call.values[1:]))
        tracer_used, shapes_from = "concrete", "run"
        ctracer = ConcreteTracer(call.values, leaves)
        try:
            with state_kept(private), torch.no_grad():
                reads.clear()
                graph = _traced(ctracer, private, call, reads)
        except TraceError:
            raise
        except Exception as e:
            shown = ", ".join(str(list(t.shape)) for t in inputs if isinstance(t, torch.Tensor))
            if raised_by_user(e) and "Proxy" not in str(e) and not isinstance(e, TypeError):  # its own check
                raise TraceError(
                    f"{name}'s forward raised {type(e).__name__}{user_frame(e)} on the example input {shown}: "
                    f"{first_line(e)}; pass an example_input that it accepts"
                ) from e
            if _packs_sequences(model):
                raise TraceError(
                    f"could not trace {name}: its forward packs sequences (pack_padded_sequence/pack_sequence), "
                    "which torch.fx cannot follow; pack them before calling the model and pass the PackedSequence "
                    "as the example input, or keep the module that packs whole with leaf_modules=[...]"
                ) from e
            raise TraceError(
                f"could not trace {name}: symbolic tracing failed{where}{module_hint}: "
                f"{first_line(symbolic_error)}; tracing on the example input {shown} failed{user_frame(e)}"
                f"{current_module(ctracer)}: {first_line(e)}; "
                "try leaf_modules=[...] (CLI: --leaf) for the module named, or check the example input's shape"
                + (
                    " (a forward with use_cache builds a cache object as it runs: try "
                    "example_kwargs={'use_cache': False})"
                    if _takes(private, "use_cache") and "use_cache" not in kwargs
                    else ""
                )
            ) from e
        ctracer.record_shapes(graph)
        if ctracer.specialised:
            specialised = (
                f"{name} has data-dependent control flow{where} that symbolic tracing cannot capture "
                f"({first_line(symbolic_error)}); traced it on the example input instead: the converted "
                "model is valid for inputs shaped like "
                + ", ".join(str(list(t.shape)) for t in inputs if isinstance(t, torch.Tensor))
            )
            if warn:
                warnings.warn(specialised, ResifyWarning, stacklevel=3)
    other = _other_mode_graph(private, model, graph, call, leaves, tracer_used) if reads else None
    return Traced(private, graph, tracer_used, inputs, name, model.training, shapes_from, other, kwargs, specialised)


def _doubled(value: Any) -> Any:
    """A tensor of batch one made a batch of two (itself twice); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == 1:
        return torch.cat([value, value])
    return value


def _traced_with_shapes(
    private: nn.Module,
    call: _Call,
    leaves: list[type | str],
    tracer_used: TracerChoice,
    first: torch.fx.Graph,
    same_inputs: bool = True,
) -> torch.fx.Graph | None:
    """The other mode's graph with its shapes (those of nodes the first graph has taken from it, on
    the same inputs); None where it is the first graph again."""
    if tracer_used == "symbolic":
        graph = _traced(LeafTracer(leaves), private, call)
    else:
        ctracer = ConcreteTracer(call.values, leaves)
        with state_kept(private), torch.no_grad():
            graph = _traced(ctracer, private, call)
        ctracer.record_shapes(graph)
    interned: dict[tuple, int] = {}  # one numbering for both graphs: their keys compare
    first_keys, keys = node_keys(first, interned), node_keys(graph, interned)
    if list(first_keys.values()) == list(keys.values()):
        return None  # the same graph: forward's reads of self.training changed nothing
    if tracer_used == "symbolic" and any(n.meta.get("resify") is not None for n in first.nodes):
        infos = {k: n.meta["resify"] for n, k in first_keys.items() if n.meta.get("resify") is not None}
        known = {n: infos[k] for n, k in keys.items() if k in infos}
        record_shapes(private, graph, call.values, known if same_inputs else None)
    return graph


def _other_mode_graph(
    private: nn.Module,
    model: nn.Module,
    graph: torch.fx.Graph,
    call: _Call,
    leaves: list[type | str],
    tracer_used: TracerChoice,
) -> torch.fx.Graph | None:
    """The graph of ``private`` traced in the other mode, with shapes; None when it is the same graph.

    The copy's containers start again from the user's (a cache the first trace filled holds its
    proxies), and ``train(mode)`` is called, so that a module's own ``train`` override runs.
    """
    saved = {m: m.training for m in private.modules()}
    for mine, theirs in zip(private.modules(), model.modules()):
        own_containers(mine.__dict__, theirs.__dict__)
    mode = "train" if not private.training else "eval"  # the one traced now
    private.train(not private.training)
    try:
        try:
            other = _traced_with_shapes(private, call, leaves, tracer_used, graph)
        except Exception:
            # a batch of one that this mode rejects (BatchNorm in training): its shapes from a batch
            # of two, the same graph (the plans are compared without the batch dimension)
            doubled = replace(call, values=tuple(_doubled(v) for v in call.values))
            if all(a is b for a, b in zip(doubled.values, call.values)):
                raise
            other = _traced_with_shapes(private, doubled, leaves, tracer_used, graph, same_inputs=False)
    except Exception as e:
        raise TraceError(
            f"{type(private).__name__} reads self.training, and it traces in the mode it is in but not in {mode} "
            f"mode{user_frame(e)}: {first_line(e)}; pass an example_input that {mode} mode accepts"
        ) from e
    finally:
        for m, flag in saved.items():
            m.__dict__["training"] = flag
    return other


def _first_called_module(root: nn.Module, graph: torch.fx.Graph) -> nn.Module | None:
    called = (root.get_submodule(str(n.target)) for n in graph.nodes if n.op == "call_module")
    return next((m for m in called if any(True for _ in m.parameters())), None)


def _packs_sequences(model: nn.Module) -> bool:
    """Whether a forward in the model's tree calls one of torch's sequence-packing functions."""
    names = ("pack_padded_sequence", "pack_sequence")
    for m in model.modules():
        code = getattr(type(m).forward, "__code__", None)
        if code is not None and any(name in code.co_names for name in names):
            return True
    return False
