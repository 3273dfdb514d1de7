"""Stage 1 of the pipeline: capture a model as a torch.fx graph with a shape on every node.

``trace`` copies the model's module tree (the caller's model is never touched), tries torch.fx
symbolic tracing with the standard ``torch.nn`` layers as leaves and, when that fails on
data-dependent control flow (``if x.shape == y.shape``, ``len(x)``, ``int(x.size(0))``), falls back
to a tracer that runs the model on the concrete example input and specialises every such decision
on it. Shapes of a symbolic graph come from ``shapes.py`` (rules and meta tensors: no arithmetic,
no memory; a real run only when the model needs real values).
It writes one thing: ``node.meta["resify"]``, a :class:`TensorInfo` for each tensor-valued node.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import inspect
import os
import re
import traceback
import types
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.node import map_arg
from torch.fx.proxy import Attribute, Proxy
from torch.nn.utils import parametrize

from .errors import ResifyWarning, TraceError
from .shapes import TensorInfo, fetch, node_keys, record_shapes, state_kept, tensor_info

__all__ = ["TensorInfo", "Traced", "trace", "as_inputs", "check_device", "derive_example_input", "LeafSpec"]

#: Module types or glob patterns on qualified module names that the tracer keeps whole.
LeafSpec = Iterable[type | str]

_TORCH_DIR = os.path.dirname(torch.__file__)


@dataclass
class Traced:
    """A traced model: its graph (shapes in ``node.meta["resify"]``) over a private module tree.

    ``root`` is a structural copy of the user's model: new module objects (so attributes set on
    them, such as the tracer's tensor constants, never reach the user's model) that still share
    the user's parameter and buffer tensors until ``rewrite`` gives the result its own.
    """

    root: nn.Module
    graph: torch.fx.Graph
    tracer: str  # "symbolic" or "concrete"
    example_inputs: tuple[Any, ...]
    model_class: str
    training: bool
    shapes_from: str = "meta"  # "meta": propagated on storage-less tensors; "run": a real forward pass
    #: the graph of the other mode (eval when ``training``, else train) where ``self.training``
    #: changes what forward does; None where both modes trace to the same graph
    other_graph: torch.fx.Graph | None = None
    #: example inputs given by name (``example_kwargs``); the converted forward takes them by name too
    example_kwargs: dict[str, Any] = field(default_factory=dict)

    def other_mode(self) -> Traced | None:
        """This trace seen in the other mode (same module tree, the other graph), or None."""
        if self.other_graph is None:
            return None
        return replace(self, graph=self.other_graph, training=not self.training, other_graph=None)


def _plain_state(cls: type) -> bool:
    """True when copying an instance of ``cls`` is copying its ``__dict__`` (no custom pickling hooks)."""
    return (
        cls.__reduce_ex__ is object.__reduce_ex__
        and cls.__reduce__ is object.__reduce__
        and cls.__getstate__ is nn.Module.__getstate__
        and cls.__setstate__ is nn.Module.__setstate__
        and "__slots__" not in cls.__dict__
    )


def structural_copy(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """New module objects for the whole tree (hooks and attribute dicts copied), tensors shared.

    A module registered in two places (CoaT's ``cpe1`` is also ``serial_blocks1.0.cpe``) stays one
    module in the copy (``memo``), so it keeps the name torch.fx gives it, and the user's state_dict
    keys."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if _plain_state(cls) or parametrize.is_parametrized(module):  # what copy.copy does, in half the time
        # (a parametrized module refuses copy.copy: its class forbids pickling, not copying)
        new = object.__new__(cls)
        new.__dict__.update(module.__dict__)
        new.__dict__.pop("_compiled_call_impl", None)  # as Module.__getstate__ does
    else:
        new = copy.copy(module)
    d = new.__dict__  # written directly: Module.__setattr__'s checks cost more than the copy
    d["_parameters"] = dict(module._parameters)
    d["_buffers"] = dict(module._buffers)
    d["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    memo[id(module)] = new
    d["_modules"] = {k: None if c is None else structural_copy(c, memo) for k, c in module._modules.items()}
    _own_containers(d, module.__dict__)
    for key, value in module.__dict__.items():
        if isinstance(value, types.MethodType) and value.__self__ is module:
            d[key] = types.MethodType(value.__func__, new)  # self.forward = self.fwd in __init__
    return new


_HOOKS = ("_hooks", "_hooks_with_kwargs", "_hooks_always_called")


def _own_containers(mine: dict[str, Any], theirs: dict[str, Any]) -> None:
    """Give a copied module's ``__dict__`` its own hook dicts and its own dicts, lists and sets (a
    cache its forward fills stays the copy's), made from the original module's ``__dict__``."""
    for key, value in theirs.items():
        if key.endswith(_HOOKS) and isinstance(value, dict):
            mine[key] = type(value)(value)
        elif key not in _MODULE_STATE and isinstance(value, (dict, list, set)):
            mine[key] = _containers_copied(value)


#: Module attributes that structural_copy rebuilds itself.
_MODULE_STATE = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})


def _containers_copied(value: Any) -> Any:
    """New dicts, lists and sets all the way down; the objects they hold (tensors) are shared."""
    if type(value) in (dict, list, set):
        if isinstance(value, dict):
            return {k: _containers_copied(v) for k, v in value.items()}
        return type(value)(_containers_copied(v) for v in value)
    if isinstance(value, (dict, list, set)):  # a subclass (OrderedDict, defaultdict, …): copy.copy keeps its type
        return copy.copy(value)
    return value


def as_inputs(example_input: Any) -> tuple[Any, ...] | None:
    """Normalise ``example_input`` (a tensor, a tuple/list of tensors, or None) to a tuple."""
    if example_input is None:
        return None
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input)
    raise TraceError(
        f"example_input must be a tensor or a tuple of tensors, found {type(example_input).__name__}; "
        "pass e.g. example_input=torch.randn(8, 3, 32, 32)"
    )


def _first_parameter(model: nn.Module) -> torch.Tensor | None:
    return next(iter(model.parameters()), None)


def check_device(model: nn.Module, inputs: tuple[Any, ...]) -> None:
    """Refuse input tensors on another device than the model's first parameter (or buffer).

    A model on the meta device accepts inputs anywhere: only shapes are read from it.

    Raises:
        TraceError: names both devices and the ``.to(...)`` call that fixes it.
    """
    first = _first_parameter(model)
    if first is None:
        first = next(iter(model.buffers()), None)
    if first is None or first.device.type == "meta":
        return
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor) and t.device != first.device:
            where = "example_input" if len(inputs) == 1 else f"example_input[{i}]"
            raise TraceError(
                f"{where} is on {t.device} but {type(model).__name__}'s parameters are on {first.device}; "
                f"move it there first: {where}.to('{first.device}')"
            )


def derive_example_input(model: nn.Module, first_layer: nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """Build an example input when the model's first layer fixes its shape (nn.Linear → (2, in_features)).

    Raises:
        TraceError: the first layer does not fix the input shape; the message suggests one.
    """
    if first_layer is None:
        first_layer = next((m for m in model.modules() if any(True for _ in m.parameters(recurse=False))), None)
    param = _first_parameter(model)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    if isinstance(first_layer, nn.Linear):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, first_layer.in_features, generator=g, dtype=dtype)
        return (x.to(device),)
    hint = "example_input=torch.randn(...)"
    if isinstance(first_layer, nn.modules.conv._ConvNd):
        spatial = ", ".join(["32"] * (first_layer.weight.dim() - 2))
        hint = f"example_input=torch.randn(2, {first_layer.in_channels}, {spatial})"
    found = type(first_layer).__name__ if first_layer is not None else "no layer with parameters"
    raise TraceError(
        f"no example_input given and the first layer ({found}) does not fix the input shape; "
        f"pass one, e.g. {hint} (CLI: --input-shape)"
    )


class _LeafTracer(torch.fx.Tracer):
    """Symbolic tracer that keeps torch.nn layers and user-named modules whole."""

    def __init__(self, leaves: LeafSpec = ()) -> None:
        super().__init__()
        leaves = list(leaves)
        self._leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self._leaf_names = [x for x in leaves if isinstance(x, str)]

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        if any(fnmatch.fnmatchcase(module_qualified_name, p) for p in self._leaf_names):
            return True
        return super().is_leaf_module(m, module_qualified_name)


#: Tensor attributes the concrete tracer answers with the example's value (a dtype, a device).
_METADATA = frozenset({"dtype", "device", "is_cuda", "layout", "is_sparse", "is_quantized", "is_meta"})


class _ConcreteMixin:
    """Proxy behaviour that answers Python's questions (bool, len, int) from concrete values."""

    tracer: _ConcreteTracer

    def __getattr__(self, k: str) -> Any:
        if k in _METADATA:  # torch.finfo(x.dtype), x.to(y.device): never data, always the real value
            return getattr(self.tracer.value_of(self), k)
        return _ConcreteAttribute(self, k)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.tracer.value_of(self))

    def __int__(self) -> int:
        return int(self.tracer.value_of(self, specialise=True))

    def __index__(self) -> int:
        return int(self.tracer.value_of(self, specialise=True))

    def __float__(self) -> float:
        return float(self.tracer.value_of(self, specialise=True))

    def __str__(self) -> str:  # a message the model builds shows the real value, not Proxy(getitem)
        return str(self.tracer.value_of(self))

    def __format__(self, spec: str) -> str:
        return format(self.tracer.value_of(self), spec)


class _ConcreteProxy(_ConcreteMixin, Proxy):
    pass


class _ConcreteAttribute(_ConcreteMixin, Attribute):
    pass


class _ConcreteTracer(_LeafTracer):
    """Tracer whose proxies carry the value the op computed on the example input.

    Control flow that depends on those values is decided on them (and counted in
    ``specialised``); the recorded graph is therefore valid for inputs shaped like the example.
    """

    #: buffers become graph values too: a buffer sliced by a traced size (BERT's position_ids) stays
    #: traced, instead of a real tensor that meets a proxy inside a torch function
    proxy_buffer_attributes = True

    def __init__(self, inputs: tuple[Any, ...], leaves: LeafSpec = ()) -> None:
        super().__init__(leaves)
        self._inputs = inputs
        self._placeholders = 0
        self.values: dict[torch.fx.Node, Any] = {}
        self.specialised = 0
        self._computing = False  # True while a leaf module runs on concrete values

    def call_module(self, m, forward, args, kwargs):  # type: ignore[override]
        if self._computing:  # inside a leaf's own forward: plain execution, nothing recorded
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):  # type: ignore[override]
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: torch.fx.Node) -> Proxy:
        return _ConcreteProxy(node, self)

    def _value_of_node(self, n: torch.fx.Node) -> Any:
        if n not in self.values and n.op == "get_attr":
            self.values[n] = fetch(self.root, n.target)  # type: ignore[arg-type]
        return self.values[n]

    def value_of(self, p: Proxy, specialise: bool = False) -> Any:
        if specialise:
            self.specialised += 1
        return self._value_of_node(p.node)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):  # type: ignore[override]
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        vargs = map_arg(node.args, self._value_of_node)
        vkwargs = map_arg(node.kwargs, self._value_of_node)
        self._computing = True
        try:
            value = self._compute(kind, target, node, vargs, vkwargs)
        finally:
            self._computing = False
        self.values[node] = value
        return proxy

    def _compute(self, kind: str, target: Any, node: torch.fx.Node, vargs: Any, vkwargs: Any) -> Any:
        with torch.no_grad():
            if kind == "placeholder":
                i = self._placeholders
                self._placeholders += 1
                if i < len(self._inputs):
                    value = self._inputs[i]
                elif node.args:
                    value = node.args[0]
                else:
                    raise TraceError(
                        f"the model's forward takes an input '{target}' that example_input does not "
                        f"provide (found {len(self._inputs)} input(s)); pass a tuple with one tensor per input"
                    )
            elif kind == "get_attr":
                value = fetch(self.root, target)
            elif kind == "call_function":
                value = target(*vargs, **vkwargs)
            elif kind == "call_method":
                value = getattr(vargs[0], target)(*vargs[1:], **vkwargs)
            elif kind == "call_module":
                value = self.root.get_submodule(target)(*vargs, **vkwargs)
            else:
                value = None
        return value

    def to_bool(self, obj: Proxy) -> bool:
        return bool(self.value_of(obj, specialise=True))

    def iter(self, obj: Proxy) -> Iterator:
        n = len(self.value_of(obj, specialise=True))
        return (obj[i] for i in range(n))

    def keys(self, obj: Proxy) -> Any:
        return self.value_of(obj, specialise=True).keys()


def _user_frame(e: BaseException) -> str:
    """The innermost source line outside torch where ``e`` was raised, as 'file:line: code'."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    frames = [f for f in frames if os.path.basename(os.path.dirname(f.filename)) != "resify"]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno} `{(f.line or '').strip()}`"


def _raised_by_user(e: BaseException) -> bool:
    """True when the innermost frame of ``e`` is the user's code (a ``raise`` in forward)."""
    frames = traceback.extract_tb(e.__traceback__)
    return (
        bool(frames)
        and not frames[-1].filename.startswith(_TORCH_DIR)
        and os.path.basename(os.path.dirname(frames[-1].filename)) != "resify"
    )


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


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
        TraceError: a name that forward does not take, an input given twice, or one not given.
    """
    cls = type(module)
    try:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
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
        raise TraceError(
            f"example_kwargs names {', '.join(map(repr, extra))}, which {where} does not take; "
            f"it takes {', '.join(names) or 'no named input'}"
        )
    if len(inputs) > len(positional) and _P.VAR_POSITIONAL not in kinds:
        raise TraceError(
            f"example_input has {len(inputs)} inputs but {where} takes {len(positional)} by position; "
            "pass the others by name with example_kwargs"
        )
    given = positional[: len(inputs)]
    twice = [p.name for p in given if p.name in kwargs]
    if twice:
        raise TraceError(
            f"{', '.join(map(repr, twice))} given both in example_input and in example_kwargs; give it once"
        )
    rest = [p for p in named if p not in given]
    missing = [p.name for p in rest if p.default is _P.empty and p.name not in kwargs]
    if missing:
        raise TraceError(
            f"the model's forward takes an input '{missing[0]}' that example_input does not provide (found "
            f"{len(inputs)} input(s)) in {where}; pass a tuple with one tensor per input, or name it: "
            f"example_kwargs={{'{missing[0]}': ...}} (CLI: --input-kwarg {missing[0]}=SHAPE)"
        )
    # left at their defaults, or given as plain values (use_cache=False): specialised, not traced
    concrete = {
        p.name: kwargs.get(p.name, p.default) for p in rest if p.name not in kwargs or not _holds_tensor(kwargs[p.name])
    }
    concrete.update({k: v for k, v in kwargs.items() if k in extra and not _holds_tensor(v)})
    simple = not kwargs and not (kinds & {_P.VAR_POSITIONAL, _P.VAR_KEYWORD, _P.KEYWORD_ONLY, _P.POSITIONAL_ONLY})
    if simple:
        return _Call(None, concrete, (*inputs, *(concrete[p.name] for p in rest)))
    # a forward with *args, **kwargs or names given out of order: trace a subclass whose forward
    # takes exactly the given inputs, then the rest of the named ones at their defaults
    n_extra_pos = len(inputs) - len(given)
    head = [p.name for p in given] + [f"arg_{i}" for i in range(n_extra_pos)]
    tail = [f"{n}=__defaults[{n!r}]" if n in concrete else n for n in [p.name for p in rest] + extra]
    tail = [t for t in tail if "=" not in t] + [t for t in tail if "=" in t]  # required ones first
    call = [p.name for p in given] + ([f"*({', '.join(head[len(given) :])},)"] if n_extra_pos else [])
    call += [f"{n}={n}" for n in [p.name for p in rest] + extra]
    src = f"def forward(self, {', '.join(head + tail)}):\n    return __forward(self, {', '.join(call)})\n"
    scope: dict[str, Any] = {"__forward": cls.forward, "__defaults": {p.name: p.default for p in rest} | concrete}
    exec(src, scope)
    ordered = [t.split("=")[0] for t in tail]
    by_name = {**{p.name: concrete.get(p.name) for p in rest}, **kwargs, **concrete}
    return _Call(scope["forward"], concrete, (*inputs, *(by_name[n] for n in ordered)))


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


def _named_placeholders(graph: torch.fx.Graph, call: _Call) -> None:
    """fx renames a specialised parameter ('mask' -> 'mask_1'): give the signature its name back."""
    targets = {str(n.target) for n in graph.nodes if n.op == "placeholder"}
    for n in graph.nodes:
        if n.op == "placeholder":
            base = re.sub(r"_\d+$", "", str(n.target))
            if base in call.concrete and base not in targets:
                n.target = base


def _traced(tracer: torch.fx.Tracer, module: nn.Module, call: _Call, reads: list | None = None) -> torch.fx.Graph:
    """``tracer``'s graph of ``module`` called as ``call`` says; ``reads`` collects the modules whose
    forward read ``self.training`` meanwhile."""
    with _training_probe(module, reads), _forward_of(module, call):
        graph = tracer.trace(module, concrete_args=call.concrete or None)
    _named_placeholders(graph, call)
    return graph


def trace(
    model: nn.Module,
    example_input: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    leaf_modules: LeafSpec = (),
) -> Traced:
    """Trace ``model`` into a graph with a TensorInfo on every tensor node.

    Args:
        model: any ``nn.Module``; tracing works on a structural copy and never changes it (buffers
            that a forward on the example input would update are restored).
        example_input: a tensor or tuple of tensors; derived when the first layer fixes it.
        example_kwargs: inputs given by name; every other optional parameter of ``forward`` (and
            ``**kwargs``) is traced at its default and stays optional in the converted model.
        leaf_modules: module types or glob patterns on qualified names to keep whole.

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
    name = type(model).__name__
    call = _call_for(private, inputs if inputs is not None else (None,), kwargs)
    reads: list[nn.Module] = []  # modules whose forward read self.training while traced

    symbolic_error: Exception | None = None
    where = module_hint = ""
    tracer_used, shapes_from = "symbolic", "meta"
    try:
        tracer = _LeafTracer(leaves)
        graph = _traced(tracer, private, call, reads)
    except TraceError:
        raise
    except Exception as e:  # any failure of symbolic tracing sends us to the concrete tracer
        symbolic_error = e
        where = _user_frame(e)
        module_hint = _current_module(tracer)

    if symbolic_error is None:
        if inputs is None:
            inputs = derive_example_input(private, _first_called_module(private, graph))
            call = replace(call, values=(*inputs, *call.values[1:]))
        shapes_from = record_shapes(private, graph, call.values)
    else:
        if inputs is None:
            try:
                inputs = derive_example_input(private)
            except TraceError as e:
                raise TraceError(
                    f"symbolic tracing of {name} failed{where}: {_one_line(symbolic_error)}; "
                    f"tracing on a concrete input needs one: {e}"
                ) from symbolic_error
            call = replace(call, values=(*inputs, *call.values[1:]))
        tracer_used, shapes_from = "concrete", "run"
        ctracer = _ConcreteTracer(call.values, leaves)
        try:
            with state_kept(private):
                reads.clear()
                graph = _traced(ctracer, private, call, reads)
        except TraceError:
            raise
        except Exception as e:
            shapes = ", ".join(str(list(t.shape)) for t in inputs if isinstance(t, torch.Tensor))
            if _raised_by_user(e) and "Proxy" not in str(e) and not isinstance(e, TypeError):  # its own check
                raise TraceError(
                    f"{name}'s forward raised {type(e).__name__}{_user_frame(e)} on the example input {shapes}: "
                    f"{_one_line(e)}; pass an example_input that it accepts"
                ) from e
            raise TraceError(
                f"could not trace {name}: symbolic tracing failed{where}{module_hint}: "
                f"{_one_line(symbolic_error)}; tracing on the example input {shapes} failed{_user_frame(e)}"
                f"{_current_module(ctracer)}: {_one_line(e)}; "
                "try leaf_modules=[...] (CLI: --leaf) for the module named, or check the example input's shape"
                + (
                    " (a forward with use_cache builds a cache object as it runs: try "
                    "example_kwargs={'use_cache': False})"
                    if _takes(private, "use_cache") and "use_cache" not in kwargs
                    else ""
                )
            ) from e
        _record_concrete_shapes(graph, ctracer)
        if ctracer.specialised:
            warnings.warn(
                f"{name} has data-dependent control flow{where} that symbolic tracing cannot capture "
                f"({_one_line(symbolic_error)}); traced it on the example input instead: the converted "
                "model is valid for inputs shaped like "
                + ", ".join(str(list(t.shape)) for t in inputs if isinstance(t, torch.Tensor)),
                ResifyWarning,
                stacklevel=3,
            )
    other = _other_mode_graph(private, model, graph, call, leaves, tracer_used) if reads else None
    return Traced(private, graph, tracer_used, inputs, name, model.training, shapes_from, other, kwargs)


_TRAINING = re.compile(r"\btraining\b")


@functools.cache
def _class_reads_training(cls: type) -> bool:
    """True when the source of ``cls`` (or a base outside torch.nn) mentions ``training``."""
    for klass in cls.__mro__:
        if klass is nn.Module or klass is object or klass.__module__.startswith("torch.nn"):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            return True  # no source to read: trace both modes to be safe
        if _TRAINING.search(source):
            return True
    return False


_READS: list[list] = []  # the lists the probes of the traces now running record into


@functools.cache
def _probe_class(cls: type) -> type:
    """``cls`` with ``training`` as a property that records each read (and stores the same bool)."""

    def get(self: nn.Module) -> bool:
        if _READS:
            _READS[-1].append(self)
        return self.__dict__["training"]

    def set_(self: nn.Module, value: bool) -> None:
        self.__dict__["training"] = value

    return type(
        cls.__name__,
        (cls,),
        {"training": property(get, set_), "__module__": cls.__module__, "__qualname__": cls.__qualname__},
    )


@contextlib.contextmanager
def _training_probe(root: nn.Module, reads: list | None) -> Iterator[None]:
    """Record which traced-through modules read ``self.training`` while the block runs.

    Only modules whose class source mentions ``training`` are probed (a cheap filter); their class
    is swapped for one whose ``training`` is a recording property, then restored. A forward that
    never reads it (DenseNet's dropout at rate 0) then costs no second trace.
    """
    if reads is None:
        yield
        return
    swapped = [
        (m, type(m))
        for m in root.modules()
        if not type(m).__module__.startswith("torch.nn") and _class_reads_training(type(m))
    ]
    for m, cls in swapped:
        m.__class__ = _probe_class(cls)
    _READS.append(reads)
    try:
        yield
    finally:
        _READS.pop()
        for m, cls in swapped:
            m.__class__ = cls


def _doubled(value: Any) -> Any:
    """A tensor of batch one made a batch of two (itself twice); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == 1:
        return torch.cat([value, value])
    return value


def _traced_with_shapes(
    private: nn.Module, call: _Call, leaves: list, tracer_used: str, first: torch.fx.Graph, same_inputs: bool = True
) -> torch.fx.Graph | None:
    """The other mode's graph with its shapes (those of nodes the first graph has taken from it, on
    the same inputs); None where it is the first graph again."""
    if tracer_used == "symbolic":
        graph = _traced(_LeafTracer(leaves), private, call)
    else:
        ctracer = _ConcreteTracer(call.values, leaves)
        with state_kept(private):
            graph = _traced(ctracer, private, call)
        _record_concrete_shapes(graph, ctracer)
    first_keys, keys = node_keys(first), node_keys(graph)
    if list(first_keys.values()) == list(keys.values()):
        return None  # the same graph: forward's reads of self.training changed nothing
    if tracer_used == "symbolic":
        known = {k: n.meta["resify"] for n, k in first_keys.items() if n.meta.get("resify") is not None}
        record_shapes(private, graph, call.values, known if same_inputs else None)
    return graph


def _record_concrete_shapes(graph: torch.fx.Graph, ctracer: _ConcreteTracer) -> None:
    """Shapes from the values the concrete tracer computed (nodes only control flow needed dropped)."""
    _drop_specialisation_nodes(graph, ctracer.values)
    for n in graph.nodes:
        n.meta["resify"] = tensor_info(ctracer.values.get(n))


def _other_mode_graph(
    private: nn.Module, model: nn.Module, graph: torch.fx.Graph, call: _Call, leaves: list, tracer_used: str
) -> torch.fx.Graph | None:
    """The graph of ``private`` traced in the other mode, with shapes; None when it is the same graph.

    The copy's containers start again from the user's (a cache the first trace filled holds its
    proxies), and ``train(mode)`` is called, so that a module's own ``train`` override runs.
    """
    saved = {m: m.training for m in private.modules()}
    for mine, theirs in zip(private.modules(), model.modules()):
        _own_containers(mine.__dict__, theirs.__dict__)
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
            f"mode{_user_frame(e)}: {_one_line(e)}; pass an example_input that {mode} mode accepts"
        ) from e
    finally:
        for m, flag in saved.items():
            m.__dict__["training"] = flag
    return other


def _current_module(tracer: torch.fx.Tracer) -> str:
    stack = list(getattr(tracer, "module_stack", {}) or {})
    stack = [s for s in stack if s]
    return f" in module '{stack[-1]}'" if stack else ""


def _first_called_module(root: nn.Module, graph: torch.fx.Graph) -> nn.Module | None:
    for n in graph.nodes:
        if n.op == "call_module":
            m = root.get_submodule(n.target)
            if any(True for _ in m.parameters()):
                return m
    return None


def _drop_specialisation_nodes(graph: torch.fx.Graph, values: dict) -> None:
    """Remove unused nodes that computed non-tensor values only to decide control flow."""
    for n in reversed(list(graph.nodes)):
        if n.op in ("call_function", "call_method") and not n.users:
            v = values.get(n)
            if not isinstance(v, torch.Tensor) and not _holds_tensor(v):
                graph.erase_node(n)


def _holds_tensor(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return any(_holds_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(_holds_tensor(x) for x in v.values())
    return isinstance(v, torch.Tensor)
