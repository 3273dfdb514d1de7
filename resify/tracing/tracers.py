"""The torch.fx tracers that stage 1 (``trace.py``) runs, and its probe of ``self.training``.

* :class:`LeafTracer`: symbolic tracing that keeps ``torch.nn`` layers and user-named modules whole;
* :class:`ConcreteTracer`: the fallback for data-dependent control flow; its proxies carry the
  value each op computed on the example input, and every question Python asks of them (``bool``,
  ``len``, ``int``) is answered from that value;
* :func:`training_probe`: which traced-through modules read ``self.training`` (their forward may
  then trace to another graph in the other mode);
* :func:`tracing`: the one lock under which resify traces (torch.fx patches ``nn.Module``
  process-wide while it traces), with the probe on;
* :func:`user_frame`, :func:`raised_by_user`, :func:`current_module`: where a failed trace stopped.

``trace.py`` chooses between the tracers and records shapes; nothing here knows about plans.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import inspect
import operator
import os
import re
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.node import Target, map_arg
from torch.fx.proxy import Attribute, Proxy

from ..errors import TraceError
from ..ops import fetch
from .shapes import tensor_info

__all__ = [
    "LeafSpec",
    "LeafTracer",
    "ConcreteTracer",
    "tracing",
    "training_probe",
    "restore_placeholder_names",
    "holds_tensor",
    "user_frame",
    "raised_by_user",
    "current_module",
]

#: Module types or glob patterns on qualified module names that the tracer keeps whole.
LeafSpec = Iterable[type | str]


class LeafTracer(torch.fx.Tracer):
    """Symbolic tracer that keeps torch.nn layers and user-named modules whole.

    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))
    >>> graph = LeafTracer(["1"]).trace(model)
    >>> [str(n.target) for n in graph.nodes if n.op == "call_module"]
    ['0', '1']
    """

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

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """A module the traced root does not hold (an instance made at import time and called from a
        forward, such as a function the ``kernels`` package turns into a module for transformers'
        rotary embedding) is traced through, as the function it stands for: there is no name to
        record it under."""
        try:
            self.path_of_module(m)
        except NameError:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


#: Tensor attributes the concrete tracer answers with the example's value (a dtype, a device).
_METADATA = frozenset({"dtype", "device", "is_cuda", "layout", "is_sparse", "is_quantized", "is_meta"})


class _ConcreteMixin(Proxy):
    """Proxy behaviour that answers Python's questions (bool, len, int) from concrete values."""

    tracer: ConcreteTracer

    def __getattr__(self, k: str) -> Any:
        if k in _METADATA:  # torch.finfo(x.dtype), x.to(y.device): never data, always the real value
            return getattr(self.tracer.value_of(self), k)
        return _ConcreteAttribute(self, k)

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


class _ConcreteProxy(_ConcreteMixin):
    pass


class _ConcreteAttribute(_ConcreteMixin, Attribute):
    pass


class ConcreteTracer(LeafTracer):
    """Tracer whose proxies carry the value the op computed on the example input.

    Control flow that depends on those values is decided on them (and counted in
    ``specialised``); the recorded graph is therefore valid for inputs shaped like the example.
    ``values`` maps each recorded node to the value it computed.
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

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self._computing:  # inside a leaf's own forward: plain execution, nothing recorded
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Proxy]) -> Any:
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: torch.fx.Node) -> Proxy:
        return _ConcreteProxy(node, self)

    def _value_of_node(self, n: torch.fx.Node) -> Any:
        if n not in self.values and n.op == "get_attr":
            self.values[n] = fetch(self.root, str(n.target))
        return self.values[n]

    def value_of(self, p: Proxy, specialise: bool = False) -> Any:
        """The value ``p`` computed on the example input (``specialise``: control flow reads it)."""
        if specialise:
            self.specialised += 1
        return self._value_of_node(p.node)

    def create_proxy(
        self,
        kind: str,
        target: Target,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None = None,
        type_expr: Any | None = None,
        proxy_factory_fn: Callable[[torch.fx.Node], Proxy] | None = None,
    ) -> Proxy:
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
        # obj[i], written out: what Proxy's __getitem__ records
        return (self.create_proxy("call_function", operator.getitem, (obj, i), {}) for i in range(n))

    def keys(self, obj: Proxy) -> Any:
        return self.value_of(obj, specialise=True).keys()

    def record_shapes(self, graph: torch.fx.Graph) -> None:
        """Write ``node.meta["resify"]`` from the values computed while tracing ``graph``, first
        removing the unused nodes that computed non-tensor values only to decide control flow."""
        for n in reversed(list(graph.nodes)):
            if n.op in ("call_function", "call_method") and not n.users and not holds_tensor(self.values.get(n)):
                graph.erase_node(n)
        for n in graph.nodes:
            n.meta["resify"] = tensor_info(self.values.get(n))


def holds_tensor(v: Any) -> bool:
    """True for a tensor, or a list, tuple or dict with a tensor anywhere inside.

    >>> holds_tensor([1, {"a": torch.ones(1)}]), holds_tensor((1, "x"))
    (True, False)
    """
    if isinstance(v, (list, tuple)):
        return any(holds_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(holds_tensor(x) for x in v.values())
    return isinstance(v, torch.Tensor)


# ---------------------------------------------------------------------------------------------
# the probe of self.training

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


_READS: list[list[nn.Module]] = []  # the lists the probes of the traces now running record into


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
def training_probe(root: nn.Module, reads: list[nn.Module] | None) -> Iterator[None]:
    """Record in ``reads`` which traced-through modules read ``self.training`` while the block runs.

    Only modules whose class source mentions ``training`` are probed (a cheap filter); their class
    is swapped for one whose ``training`` is a recording property, then restored. A forward that
    never reads it (DenseNet's dropout at rate 0) then costs no second trace. ``reads=None``: no probe.
    """
    if reads is None:
        yield
        return
    swapped: list[tuple[nn.Module, type]] = []
    for m in root.modules():
        cls: type = type(m)
        if not cls.__module__.startswith("torch.nn") and _class_reads_training(cls):
            swapped.append((m, cls))
    for m, cls in swapped:
        m.__class__ = _probe_class(cls)
    _READS.append(reads)
    try:
        yield
    finally:
        _READS.pop()
        for m, cls in swapped:
            m.__class__ = cls


#: torch.fx patches ``nn.Module.__call__`` and ``__getattr__`` process-wide while it traces, and the
#: probe records into one stack: two threads tracing at once would record into each other's graphs
_TRACING = threading.RLock()


@contextlib.contextmanager
def tracing(root: nn.Module, reads: list[nn.Module] | None = None) -> Iterator[None]:
    """Hold the one lock under which resify traces (one trace at a time in the process), with
    :func:`training_probe` recording into ``reads``."""
    with _TRACING, training_probe(root, reads):
        yield


def restore_placeholder_names(graph: torch.fx.Graph, concrete: Iterable[str]) -> None:
    """fx renames a parameter it specialised ('mask' -> 'mask_1'): give the signature its name back
    (``concrete``: the names passed as fx's ``concrete_args``)."""
    names = set(concrete)
    targets = {str(n.target) for n in graph.nodes if n.op == "placeholder"}
    for n in graph.nodes:
        if n.op == "placeholder":
            base = re.sub(r"_\d+$", "", str(n.target))
            if base in names and base not in targets:
                n.target = base


# ---------------------------------------------------------------------------------------------
# where a trace failed: the user's line and module, for the error message

_TORCH_DIR = os.path.dirname(torch.__file__)


def user_frame(e: BaseException) -> str:
    """The innermost source line outside torch and resify where ``e`` was raised, as
    `` at model.py:12 `code` `` ('' when there is none)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    frames = [f for f in frames if os.path.basename(os.path.dirname(f.filename)) != "resify"]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {os.path.basename(f.filename)}:{f.lineno} `{(f.line or '').strip()}`"


def raised_by_user(e: BaseException) -> bool:
    """True when the innermost frame of ``e`` is the user's code (a ``raise`` in forward)."""
    frames = traceback.extract_tb(e.__traceback__)
    return (
        bool(frames)
        and not frames[-1].filename.startswith(_TORCH_DIR)
        and os.path.basename(os.path.dirname(frames[-1].filename)) != "resify"
    )


def current_module(tracer: torch.fx.Tracer) -> str:
    """The module ``tracer`` was tracing through (where it failed), as `` in module 'blocks.0'``, or ''."""
    stack = list(getattr(tracer, "module_stack", {}) or {})
    stack = [s for s in stack if s]
    return f" in module '{stack[-1]}'" if stack else ""
