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
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.graph_module import _copy_attr, _deserialize_graph_module, _format_import_block, _forward_from_src
from torch.package import sys_importer

from .ops import fetch

__all__ = ["Shortcut", "DualGraphModule", "GATE_PARAMETERS"]

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
