"""The ``nn.Module`` classes a converted model is made of (built by ``rewrite``).

* :class:`Shortcut` holds one site's new parameters (the gate α or γ, the preserve_output β) and
  its projection modules; ``reset_parameters()`` restores their initial values, so the usual
  meta-device workflow (build on meta → ``apply`` → ``to_empty`` → ``reset_parameters`` on every
  module that has one) gives the same model as converting on the CPU. Every parameter has at least
  one dimension: FSDP2's ``fully_shard`` refuses scalar parameters.
* :class:`DualGraphModule` is a GraphModule with one graph per mode, for models whose forward
  reads ``self.training`` (torchvision's feature extraction does the same): ``train()`` and
  ``eval()`` switch graphs, and pickling, ``copy.deepcopy`` and ``torch.save`` keep both.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Callable, Hashable
from typing import Any, Protocol

import torch
import torch.fx
from torch import nn
from torch.fx.graph_module import _copy_attr, _deserialize_graph_module, _format_import_block, _forward_from_src
from torch.package import sys_importer

from ..ops import fetch

__all__ = [
    "Shortcut",
    "DualGraphModule",
    "OwnerForward",
    "OwnerCall",
    "install_forward",
    "strip_forward",
    "is_owner",
    "run_owner",
    "GATE_PARAMETERS",
    "FORWARD_ATTRIBUTE",
    "graph_code",
]

#: The parameter a gate kind adds to a Shortcut.
GATE_PARAMETERS = {"rezero": "alpha", "layerscale": "gamma"}


class Shortcut(nn.Module):
    """One site's new modules and parameters, under ``resify.<site>``.

    Children (created by ``rewrite``): ``pool``, ``proj``, ``norm``; parameters: ``alpha`` (rezero,
    shape ``(1,)``), ``gamma`` (layerscale, one value per channel), ``beta`` (preserve_output,
    shape ``(1,)``, starts at 0).
    """

    def __init__(self, gate_init: float | None = None) -> None:
        super().__init__()
        self.gate_init = gate_init

    def reset_parameters(self) -> None:
        """Gates back to ``gate_init``, β back to 0 (children reset themselves)."""
        with torch.no_grad():
            for name in GATE_PARAMETERS.values():
                p = self._parameters.get(name)
                if p is not None:
                    p.fill_(0.0 if self.gate_init is None else self.gate_init)
            beta = self._parameters.get("beta")
            if beta is not None:
                beta.zero_()

    def extra_repr(self) -> str:
        return "" if self.gate_init is None else f"gate_init={self.gate_init}"


class DualGraphModule(torch.fx.GraphModule):
    """A GraphModule with a train-mode and an eval-mode graph; ``train(mode)`` selects one.

    Both graphs call the same module objects, so parameters, buffers and ``state_dict`` are those of
    one model. ``.graph``/``.code`` are the current mode's; ``train_graph``/``eval_graph`` both.
    """

    def __init__(
        self, root: nn.Module, train_graph: torch.fx.Graph, eval_graph: torch.fx.Graph, class_name: str = "GraphModule"
    ) -> None:
        training = root.training
        super().__init__(root, train_graph if training else eval_graph, class_name)
        for node in (*train_graph.nodes, *eval_graph.nodes):  # modules only one graph calls
            if node.op in ("get_attr", "call_module") and not _has(self, str(node.target)):
                _copy_attr(root, self, str(node.target))
        self.train_graph = train_graph
        self.eval_graph = eval_graph
        self.training = training

    def train(self, mode: bool = True) -> DualGraphModule:
        super().train(mode)
        want = self.train_graph if mode else self.eval_graph
        if self.graph is not want:
            self.graph = want  # the setter recompiles forward
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        body = self.__dict__.copy()
        for key in ("_graph", "train_graph", "eval_graph", "_code"):
            body.pop(key, None)
        codes = []
        for graph in (self.train_graph, self.eval_graph):
            python_code = graph.python_code(root_module="self")
            codes.append((_format_import_block(python_code.globals, sys_importer), python_code.src))
        return (_rebuild_dual, (body, codes, self.training, type(self).__name__))

    def __deepcopy__(self, memo: dict[int, Any]) -> DualGraphModule:
        body = copy.deepcopy({k: v for k, v in self.__dict__.items() if k != "_code"}, memo)
        root = _Body(body)
        res = DualGraphModule(root, body["train_graph"], body["eval_graph"], type(self).__name__)
        res._modules = body["_modules"]
        res.meta = body.get("meta", {})
        memo[id(self)] = res
        return res

    def __copy__(self) -> DualGraphModule:
        res = DualGraphModule(self, self.train_graph, self.eval_graph, type(self).__name__)
        res._modules = dict(self._modules)
        res.meta = self.meta
        return res


class _Body(nn.Module):
    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__()
        self.__dict__ = body


def _has(module: nn.Module, target: str) -> bool:
    try:
        fetch(module, target)
    except AttributeError:
        return False
    return True


def _rebuild_dual(
    body: dict[str, Any], codes: list[tuple[str, str]], training: bool, class_name: str
) -> DualGraphModule:
    """Unpickle a DualGraphModule: re-trace each mode's generated code, as GraphModule does."""
    graphs = []
    for import_block, src in codes:
        forward = _forward_from_src(import_block + src, {})
        graph = _deserialize_graph_module(forward, dict(body)).graph
        assert isinstance(graph, torch.fx.Graph)
        graphs.append(graph)
    root = _Body(body)
    root.training = training
    res = DualGraphModule(root, graphs[0], graphs[1], class_name)
    # fx rebuilds the tree from the graphs' targets with plain, train-mode containers: keep the
    # pickled tree itself (its Shortcut holders, its modes), whose leaves the graphs already call
    res._modules = body["_modules"]
    return res


def graph_code(graph: torch.fx.Graph) -> tuple[str, str]:
    """A graph's forward as source: (its imports, its ``def forward(self, …)``)."""
    python_code = graph.python_code(root_module="self")
    return _format_import_block(python_code.globals, sys_importer), python_code.src


class VariantMaker(Protocol):
    """Makes the rewritten forward's code for a call whose optional arguments were not traced."""

    def __call__(
        self, owner: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> dict[bool, tuple[str, str]]: ...


def call_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
    """What a traced forward was specialised on: which inputs are tensors, None, or which plain value."""

    def kind(v: Any) -> Hashable:
        if isinstance(v, (torch.Tensor, torch.fx.Proxy)):  # a Proxy: traced again, as a tensor
            return "T"
        if v is None or isinstance(v, (bool, int, float, str)):
            return (type(v).__name__, v)
        return type(v).__name__

    return (tuple(kind(a) for a in args), tuple(sorted((k, kind(v)) for k, v in kwargs.items())))


#: The instance attribute of an owner module that holds its rewritten forward's code.
FORWARD_ATTRIBUTE = "_resify_forward"


class OwnerForward:
    """The rewritten forward of a module that owns shortcuts: its traced graph's source, with the
    shortcuts inserted, one per mode where forward reads ``self.training`` and one per way of calling
    it (a call that gives an optional argument the trace left at its default is traced once more,
    with the same shortcuts, by ``maker``). It holds no reference to its module: copies of the module
    (deepcopy, pickle, a DataParallel replica) share it. The compiled functions are not pickled.
    """

    def __init__(self, codes: dict[Hashable, dict[bool, tuple[str, str]]], maker: VariantMaker | None) -> None:
        self.codes = codes  # call key -> {training: (imports, source)}
        self.maker = maker
        self._fns: dict[tuple[Hashable, bool], Callable[..., Any]] = {}

    def function(self, owner: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[..., Any]:
        """The compiled forward (a plain function of ``(self, …)``) for this call of ``owner``."""
        key = call_key(args, kwargs)
        fn = self._fns.get((key, owner.training))
        if fn is None:
            codes = self.codes.get(key)
            if codes is None:
                if self.maker is None:
                    raise TypeError(f"{type(owner).__name__}.forward was converted for other inputs than these")
                codes = self.codes[key] = self.maker(owner, args, kwargs)
            imports, src = codes[owner.training] if owner.training in codes else codes[not owner.training]
            fn = self._fns[(key, owner.training)] = _forward_from_src(imports + src, {})
        return fn

    def signature(self, owner: nn.Module) -> inspect.Signature:
        """The signature of the first traced call's forward, without ``self``."""
        key = next(iter(self.codes))
        codes = self.codes[key]
        imports, src = codes[owner.training] if owner.training in codes else next(iter(codes.values()))
        sig = inspect.signature(_forward_from_src(imports + src, {}))
        return sig.replace(parameters=list(sig.parameters.values())[1:])

    def __getstate__(self) -> dict[str, Any]:
        return {"codes": self.codes, "maker": self.maker}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["codes"], state["maker"])  # type: ignore[misc]


def run_owner(owner: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """An owner's forward: its :class:`OwnerForward`'s code for this call, run on ``owner``."""
    forward: OwnerForward = owner.__dict__[FORWARD_ATTRIBUTE]
    return forward.function(owner, args, kwargs)(owner, *args, **kwargs)


class OwnerCall(functools.partial):
    """``module.forward`` of an owner: ``run_owner`` bound to the module (a partial, so that pickling,
    deepcopy and torch.export see through it), with the rewritten forward's signature."""

    @property
    def __signature__(self) -> inspect.Signature:
        owner = self.args[0]
        return owner.__dict__[FORWARD_ATTRIBUTE].signature(owner)

    def bound_to(self, owner: nn.Module) -> OwnerCall:
        """The same forward for another copy of the module (a DataParallel replica, a structural copy)."""
        return OwnerCall(run_owner, owner)

    @property
    def owner(self) -> nn.Module:
        return self.args[0]


def strip_forward(module: nn.Module) -> None:
    """Take resify's forward off the instance: the class's forward is its forward again."""
    for attr in ("forward", FORWARD_ATTRIBUTE, "_replicate_for_data_parallel"):
        module.__dict__.pop(attr, None)


def install_forward(module: nn.Module, forward: OwnerForward) -> None:
    """Make ``forward`` the instance's forward (the class's stays what it is)."""
    module.__dict__[FORWARD_ATTRIBUTE] = forward
    module.__dict__["forward"] = OwnerCall(run_owner, module)
    module.__dict__["_replicate_for_data_parallel"] = ReplicateWithForward(module)


def is_owner(module: nn.Module) -> bool:
    """True for a module whose forward resify rewrote."""
    return isinstance(module.__dict__.get(FORWARD_ATTRIBUTE), OwnerForward)


class ReplicateWithForward:
    """``module._replicate_for_data_parallel`` that gives each replica its own rewritten forward
    (the replica's ``__dict__`` is a copy of the module's, whose forward calls the module itself)."""

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner

    def __call__(self) -> nn.Module:
        replica = nn.Module._replicate_for_data_parallel(self.owner)
        replica.__dict__["forward"] = OwnerCall(run_owner, replica)
        replica.__dict__.pop("_replicate_for_data_parallel", None)
        return replica

    def bound_to(self, owner: nn.Module) -> ReplicateWithForward:
        return ReplicateWithForward(owner)
