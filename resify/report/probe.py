"""The hooks that measure gradient flow: which modules are layers, and what one backward records.

``Probe`` puts forward hooks on the layers and gradient hooks on their weights, and writes every
figure (computed by ``figures``) into a ``figures.Sink``. Two drivers share it, so they take the same figures the same way:
``measure.gradient_flow`` attaches one probe per call (it reads each gradient when it is complete
and drops it), ``resify.watch`` attaches one for every N-th backward of a training loop (it reads
each weight's gradient of that backward as it arrives and leaves it to the optimizer).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..constants import NAMESPACE
from ..errors import ResifyError
from ..ops import module_kind as layer_kind
from ..ops import stored_weight
from ..rewriting.modules import Shortcut
from .figures import BATCH_NUMEL, Sink, activation_figures, figures_of, l2_norm, stacked_figures

__all__ = [
    "Probe",
    "find_layers",
    "as_leaf",
    "measuring",
    "is_measuring",
    "first_tensor",
    "is_added",
    "stored_weight",
    "layer_kind",
    "layer_modules",
    "gate_parameters",
]


_state = threading.local()

#: (torch 2.2+) names a tensor's place in the graph as the forward left it: ``Probe.backward`` asks for
#: the gradients there, and only there
_gradient_edge = getattr(torch.autograd.graph, "get_gradient_edge", None)
#: the autograd node running now, None outside a backward: a layer called inside one is activation
#: checkpointing's recompute, whose figures the forward took (all but the input gradients that reentrant
#: checkpointing only makes there)
_backward_node = getattr(torch._C, "_current_autograd_node", lambda: None)


@contextlib.contextmanager
def measuring() -> Iterator[None]:
    """Mark this thread as inside ``gradient_flow``: a watch on the same model does not count its pass."""
    before = getattr(_state, "measuring", False)
    _state.measuring = True
    try:
        yield
    finally:
        _state.measuring = before


def is_measuring() -> bool:
    return getattr(_state, "measuring", False)


def is_added(name: str) -> bool:
    return NAMESPACE in name.split(".")


def layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules with a weight of two or more dimensions (stored or parametrized), by qualified name."""
    return {name: m for name, m in model.named_modules() if stored_weight(m) is not None}


def find_layers(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """What a probe measures: the layers, resify's gates, and the tensor whose gradient each is read from.

    Returns:
        ``(layers, gates, weights)``: layer name -> module; gate name -> parameter; layer or gate
        name -> its stored weight (the gate itself for a gate).

    Raises:
        ResifyError: the model has no parametric layer and no gate.
    """
    weights: dict[str, torch.Tensor] = {}
    layers: dict[str, nn.Module] = {}
    gates: dict[str, torch.Tensor] = {}
    for name, m in model.named_modules():  # (one walk: a report's fixed cost)
        w = stored_weight(m)
        if w is not None:
            layers[name], weights[name] = m, w
        _add_gates(name, m, gates)
    if not layers and not gates:
        raise ResifyError(
            f"{type(model).__name__} has no parametric layer (a module with a weight of 2 or more "
            "dimensions, such as nn.Linear or nn.Conv2d); nothing to report"
        )
    weights.update(gates)
    return layers, gates, weights


def as_leaf(t: Any) -> Any:
    """A tensor as a new leaf of the graph, requiring grad where it is floating point, so that the
    gradient arriving at the first layer's input is measured too; anything else as it is."""
    if isinstance(t, torch.Tensor):
        t = t.detach()
        return t.requires_grad_() if t.is_floating_point() else t
    return t


def gate_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Bare parameters resify inserted (gates): owned by a Shortcut (or a plain container) under the namespace."""
    found: dict[str, torch.Tensor] = {}
    for mname, m in model.named_modules():
        _add_gates(mname, m, found)
    return found


def _add_gates(mname: str, m: nn.Module, found: dict[str, torch.Tensor]) -> None:
    if (type(m) is nn.Module or isinstance(m, Shortcut)) and is_added(mname):
        for pname, p in m._parameters.items():
            if p is not None:
                found[f"{mname}.{pname}"] = p


def first_tensor(args: Any) -> torch.Tensor | None:
    if isinstance(args, torch.Tensor):
        return args
    if isinstance(args, Mapping):
        args = list(args.values())
    if isinstance(args, (tuple, list)):
        for a in args:
            t = first_tensor(a)
            if t is not None:
                return t
    return None


class Probe:
    """The hooks that measure one forward and backward.

    Forward hooks on the layers record the call order, the norm of each output and how alike its
    examples are (``figures.activation_figures``), and put a gradient hook on each layer's input
    tensor (a tensor changed in place since an earlier layer took it counts as another input).
    Weight gradients are read by one of two kinds of hook:

    - ``keep_grads=False`` (``gradient_flow``, which runs the backward by ``backward``: the weights'
      and the inputs' gradients only, no bias's or norm's): a post-accumulate hook on every weight
      (and gate) reads its gradient (mean |grad|, norm) the moment it is complete and then drops
      it, so the report holds one weight gradient at a time beside the user's own (which it has
      put aside).
    - ``keep_grads=True`` (``watch``): a hook on each weight reads the gradient of this backward as
      it arrives, before it is added to ``.grad``, and changes nothing: the optimizer gets it as
      it would have. The figure is the same where ``.grad`` was empty; under gradient
      accumulation it is this backward's share, and under DDP this rank's, before the all-reduce.
      Small gradients are put aside and measured together by ``finish``, at the end of the backward.

    A probe can be attached again after ``detach`` (a watch reuses one for every step it records),
    and it keeps what a step allocates small: its hooks and keys are made once, so that a step
    leaves little for the garbage collector.
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        weights: Mapping[str, torch.Tensor],
        sink: Sink | None = None,
        *,
        keep_grads: bool = False,
    ) -> None:
        self.layers = layers
        self.weights = weights
        self.sink = sink if sink is not None else Sink()
        self.batch = 0
        self.keep_grads = keep_grads
        self.called: dict[str, int] = {}  # name -> index of first call
        self._weight_names: dict[int, tuple[str, ...]] = {}
        for name, w in weights.items():
            self._weight_names[id(w)] = (*self._weight_names.get(id(w), ()), name)
        unique = {id(w): w for w in weights.values() if w.requires_grad}
        self._params: list[torch.Tensor] = list(unique.values())  # (a hook on every bias would cost more than it holds)
        # plain parameters: ``backward`` may name them (a DTensor's gradient reaches it by FSDP's own hooks)
        self._plain = all(type(p) in (nn.Parameter, torch.Tensor) for p in self._params)
        self._forward_hooks = {name: self._forward_hook(name) for name in layers}
        self._param_hooks = [
            self._arriving_hook(self._weight_names[id(p)]) if keep_grads else self._weight_hook for p in self._params
        ]
        self._keys: dict[tuple, tuple] = {}
        self._hook_dict = "_backward_hooks" if keep_grads else "_post_accumulate_grad_hooks"
        self._bare: list[torch.Tensor] = []  # parameters that had no hook dict before attach()
        self._own: set[int] = set()
        self._on_input = self._input_grad  # one bound method for every input hook
        # id -> (input tensor, the first layer taking it, the tensor's version then)
        self._tensors: dict[int, tuple[torch.Tensor, str, int]] = {}
        self._also: dict[str, list[str]] = {}  # that layer -> every layer taking the same tensor
        self._edges: list[Any] = []  # (keep_grads=False) the gradient edge of each input tensor hooked
        self._grad_off = False  # a layer ran without grad mode (reentrant checkpointing): the whole backward
        self._input_seen: set[str] = set()  # the layers whose input the forward hooked (not again in a recompute)
        self._handles: list[Any] = []
        self._normed: set[int] = set()  # the weights whose norm a gradient hook took (add_weight_norms: the rest)
        # put aside until finish() (keep_grads): tensors, the names each is measured for, and whether it is
        # a weight's gradient (mean |grad| and norm) or an input's (norm)
        self._later: list[torch.Tensor] = []
        self._later_names: list[Sequence[str]] = []
        self._later_weight: list[bool] = []

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        try:
            self.attach()
            yield
        finally:
            self.detach()

    def attach(self, sink: Sink | None = None) -> None:
        """Put the hooks on (the layers' forward hooks and the weights' gradient hooks); with ``sink``,
        start a new record into it (``called`` starts again too)."""
        if sink is not None:
            self.sink, self.called = sink, {}
            self._later, self._later_names, self._later_weight = [], [], []
        handles = self._handles
        self._bare = [p for p in self._params if getattr(p, self._hook_dict, None) is None]
        self._own = {id(p) for p in self._bare}  # no hook of the user's sees their gradients: ours to overwrite
        for name, m in self.layers.items():
            handles.append(m.register_forward_hook(self._forward_hooks[name], with_kwargs=True))
        for p, hook in zip(self._params, self._param_hooks):
            if self.keep_grads:
                handles.append(p.register_hook(hook))
            else:
                handles.append(p.register_post_accumulate_grad_hook(hook))

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` that computes only what the figures read: the weights' gradients and those
        arriving at the layers' inputs (named by their gradient edges, so that nothing is stored on
        them). No other parameter's gradient (biases, norms) is made, so none is written and set
        aside again, and the user's hooks on those never run. The report then allocates about what
        a plain step does, in the blocks it has just freed: a 20-layer MLP's report went from
        1.65-1.77× a plain step to 1.43-1.49× (medians; benchmarks/README.md). A torch without
        ``get_gradient_edge`` (before 2.2), a model that ran a layer without grad mode (reentrant
        activation checkpointing, whose backward refuses ``inputs=``) and one whose weights are not
        plain parameters (FSDP2's DTensors, whose gradients its own hooks move) run the whole backward."""
        named = _gradient_edge is not None and self._plain and not self._grad_off
        inputs = [*self._params, *self._edges] if named else []
        if inputs:
            torch.autograd.backward(loss, inputs=inputs)
        else:
            loss.backward()

    def detach(self) -> None:
        """Take every hook off again (those put on input tensors during the forward too)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._tensors.clear()
        self._edges, self._grad_off = [], False
        self._input_seen = set()
        for p in self._bare:  # no empty hook dict left behind: autograd would call into it at every backward
            if not getattr(p, self._hook_dict, None):
                setattr(p, self._hook_dict, None)
        self._bare, self._own = [], set()
        self._also = {}  # (a new one: the hooks put aside may still hold lists of the old)

    def add_weight_norms(self) -> None:
        """The norm of each weight, for ``grad_to_weight``: those a gradient hook has not taken already
        (``keep_grads=False`` takes a large weight's norm beside its gradient's, while the backward
        still has it in cache); small weights of one size in one reduction."""
        with torch.no_grad():
            names = [n for n, w in self.weights.items() if id(w) not in self._normed]
            self._measure([self.weights[n] for n in names], [(n,) for n in names], "weight")
        self._normed = set()

    def finish(self) -> None:
        """Measure what the hooks put aside (``keep_grads``: the small gradients of this backward)."""
        tensors, names, weight = self._later, self._later_names, self._later_weight
        self._later, self._later_names, self._later_weight = [], [], []
        with torch.no_grad():
            for kind in ("input", "grad"):
                pick = [i for i, w in enumerate(weight) if w == (kind == "grad")]
                self._measure([tensors[i] for i in pick], [names[i] for i in pick], kind)

    def _key(self, *key: Any) -> tuple:
        """One key object per key, kept: the records of a step allocate no new ones."""
        return self._keys.setdefault(key, key)

    def _measure(self, tensors: list[torch.Tensor], names: Sequence[Sequence[str]], kind: str) -> None:
        """Add the figures of each tensor under each of its names: its norm (``kind`` "weight" or
        "input"), or for "grad" its mean |x| and its norm.

        Tensors of up to ``BATCH_NUMEL`` elements are stacked with the others of their shape,
        device and dtype and reduced together: the same figures as one at a time (to the last bit
        on one CPU thread), for a fraction of the calls.
        """
        groups: dict[Any, list[int]] = {}
        for i, t in enumerate(tensors):
            small = 0 < t.numel() <= BATCH_NUMEL and t.layout == torch.strided
            groups.setdefault((t.device, t.dtype, t.shape) if small else i, []).append(i)
        grads, batch, cache = kind == "grad", self.batch, self._keys
        keys: list[tuple] = []
        values: list[Any] = []
        for idx in groups.values():
            group = [tensors[i] for i in idx]
            figures = stacked_figures(group, grads) if len(group) > 1 else [figures_of(group[0], grads)]
            for i, (mean_abs, norm) in zip(idx, figures):
                for n in names[i]:
                    if grads:
                        k1, k2 = ("mean_abs", n, batch), ("grad_norm", n, batch)
                        keys += (cache.setdefault(k1, k1), cache.setdefault(k2, k2))
                        values += (mean_abs, norm)
                    else:
                        k = ("weight", n) if kind == "weight" else ("input", n, batch)
                        keys.append(cache.setdefault(k, k))
                        values.append(norm)
        self.sink.extend(keys, values)

    def _forward_hook(self, name: str) -> Callable:
        # a 3-D output of any layer but a convolution is a sequence: its positions are compared too
        sequence = not isinstance(self.layers[name], nn.modules.conv._ConvNd)

        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            recompute = _backward_node() is not None  # (checkpointing)
            if recompute and name in self._input_seen:
                return
            if not recompute:
                if not torch.is_grad_enabled():  # reentrant checkpointing, which refuses a backward with inputs=
                    self._grad_off = True
                if name not in self.called:
                    self.called[name] = len(self.called)
                out = output if isinstance(output, torch.Tensor) else first_tensor(output)
                if out is not None and out.is_floating_point() and out.numel():
                    self._output(name, out.detach(), sequence)
            x = args[0] if args and isinstance(args[0], torch.Tensor) else first_tensor((args, kwargs))
            if x is None or not x.requires_grad:
                return
            if not recompute:
                self._input_seen.add(name)
            first = self._tensors.get(id(x))
            if first is not None and first[0] is x and first[2] == x._version:  # an earlier layer takes it too
                also = self._also.setdefault(first[1], [first[1]])
                if name not in also:
                    also.append(name)
                return
            # (the reference keeps the id from being reused; an in-place op since makes it another input)
            self._tensors[id(x)] = (x, name, x._version)
            if not (self.keep_grads or recompute) and _gradient_edge is not None:
                self._edges.append(_gradient_edge(x))  # (now: an in-place op later would move the tensor's)
            self._handles.append(x.register_hook(functools.partial(self._on_input, name, self.batch)))

        return hook

    def _output(self, name: str, out: torch.Tensor, sequence: bool) -> None:
        """One layer output's figures, at once: a later in-place op (ReLU(inplace=True)) would change it."""
        norm, similarity = activation_figures(out, sequence)
        act = self._key("act", name, self.batch, out.numel())
        if similarity is None:
            self.sink.extend([act], [norm])
        else:
            self.sink.extend([act, self._key("sim", name, self.batch)], [norm, similarity])

    def _weight_hook(self, p: torch.Tensor) -> None:
        g = p.grad
        names = self._weight_names.get(id(p))
        if g is not None and names:  # (backward runs without grad mode: nothing here is recorded)
            mean_abs, norm = figures_of(g, True, in_place=id(p) in self._own)  # (the gradient is dropped next)
            keys = [self._key(kind, n, self.batch) for n in names for kind in ("mean_abs", "grad_norm")]
            self.sink.extend(keys, [mean_abs, norm] * len(names))
            if p.numel() > BATCH_NUMEL and id(p) not in self._normed:  # now, while the backward has it in cache
                self._normed.add(id(p))
                weight = l2_norm(p.detach())
                self.sink.extend([self._key("weight", n) for n in names], [weight] * len(names))
        p.grad = None

    def _arriving_hook(self, names: tuple[str, ...]) -> Callable:
        def hook(grad: torch.Tensor) -> None:
            if grad.numel() <= BATCH_NUMEL and grad.layout == torch.strided:  # kept until finish(): a small clone
                self._later.append(grad.detach())
                self._later_names.append(names)
                self._later_weight.append(True)
            else:
                self._measure([grad.detach()], [names], "grad")

        return hook

    def _input_grad(self, name: str, batch: int, grad: torch.Tensor) -> None:
        """The gradient arriving at the input of ``name`` (and of the layers that take the same tensor)."""
        names = self._also.get(name, (name,))
        if self.keep_grads and grad.numel() <= BATCH_NUMEL:
            self._later.append(grad.detach())
            self._later_names.append(names)
            self._later_weight.append(False)
            return
        norm = l2_norm(grad.detach())
        for n in names:
            self.sink.add(self._key("input", n, batch), norm)
