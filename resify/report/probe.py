"""The hooks that measure gradient flow: which modules are layers, and what one backward records.

``Probe`` puts forward hooks on the layers and post-accumulate hooks on the parameters, and
writes every figure into a ``Sink`` that reads them back to the host at once; ``combine`` turns
the sink into per-layer means. ``measure.gradient_flow`` drives one probe per call.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..constants import NAMESPACE
from ..modules import Shortcut
from ..ops import parametrized_originals

__all__ = [
    "Probe",
    "Sink",
    "combine",
    "l2_norm",
    "first_tensor",
    "is_added",
    "stored_weight",
    "layer_kind",
    "layer_modules",
    "gate_parameters",
]


def is_added(name: str) -> bool:
    return NAMESPACE in name.split(".")


def stored_weight(m: nn.Module) -> torch.Tensor | None:
    """The parameter that holds a module's weight: ``weight`` itself, or where the weight is computed
    (a parametrization, old-style ``weight_norm``/``spectral_norm``) the tensor it is computed from."""
    w = m._parameters.get("weight")
    if w is None and parametrize.is_parametrized(m, "weight"):
        w = max(parametrized_originals(m), key=lambda p: (p.dim(), p.numel()), default=None)
    if w is None:
        w = m._parameters.get("weight_orig", m._parameters.get("weight_v"))
    if isinstance(w, torch.Tensor) and w.dim() >= 2 and w.is_floating_point():
        return w
    return None


def layer_kind(m: nn.Module) -> str:
    """The layer's class name ("Linear" for a parametrized Linear too)."""
    cls = type(m)
    return cls.__bases__[0].__name__ if parametrize.is_parametrized(m) and cls.__bases__ else cls.__name__


def layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules with a weight of two or more dimensions (stored or parametrized), by qualified name."""
    return {name: m for name, m in model.named_modules() if stored_weight(m) is not None}


def gate_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Bare parameters resify inserted (gates): owned by a Shortcut (or a plain container) under the namespace."""
    found: dict[str, torch.Tensor] = {}
    for mname, m in model.named_modules():
        if not (type(m) is nn.Module or isinstance(m, Shortcut)) or not is_added(mname):
            continue
        for pname, p in m._parameters.items():
            if p is not None:
                found[f"{mname}.{pname}"] = p
    return found


class Sink:
    """Measured scalars under keys; read back to the host all at once (one copy per device)."""

    def __init__(self) -> None:
        self.items: list[tuple[tuple, torch.Tensor | float]] = []

    def add(self, key: tuple, value: torch.Tensor | float) -> None:
        if isinstance(value, torch.Tensor) and value.device.type == "cpu":
            value = value.item()  # no sync to avoid on the CPU, and fewer tensors to stack
        self.items.append((key, value))

    def resolve(self) -> list[tuple[tuple, float]]:
        floats: list[float] = [v if isinstance(v, float) else math.nan for _, v in self.items]
        by_device: dict[torch.device, list[int]] = {}
        for i, (_, v) in enumerate(self.items):
            if isinstance(v, torch.Tensor):
                by_device.setdefault(v.device, []).append(i)
        for idx in by_device.values():
            values = torch.stack([self.items[i][1].double() for i in idx]).tolist()  # type: ignore[union-attr]
            for i, v in zip(idx, values):
                floats[i] = v
        return [(k, f) for (k, _), f in zip(self.items, floats)]


def combine(items: list[tuple[tuple, float]], batches: int) -> dict:
    """name -> {figure: mean over batches}, and "loss" -> the mean loss.

    Keys of ``items``: ("loss",); ("weight", name) the weight's norm; ("mean_abs" | "grad_norm",
    name, batch); ("input", name, batch) the norm of the gradient at one input tensor (a layer
    called several times has several: root of the summed squares); ("act", name, batch, numel)
    the norm of one output (RMS over all the layer's outputs).
    """
    out: dict = {}
    losses: list[float] = []
    per_batch: dict[tuple[str, str, int], list[float]] = {}
    act: dict[tuple[str, int], list[float]] = {}
    for key, v in items:
        kind = key[0]
        if kind == "loss":
            losses.append(v)
        elif kind == "weight":
            out.setdefault(key[1], {})["weight"] = v
        elif kind in ("mean_abs", "grad_norm"):
            per_batch.setdefault((key[1], kind, key[2]), []).append(v)
        elif kind == "input":
            per_batch.setdefault((key[1], "input", key[2]), []).append(v * v)
        elif kind == "act":
            acc = act.setdefault((key[1], key[2]), [0.0, 0.0])
            acc[0] += v * v
            acc[1] += key[3]
    for (name, b), (ss, count) in act.items():
        per_batch[(name, "rms", b)] = [ss / count]
    collected: dict[tuple[str, str], list[float]] = {}
    for (name, kind, _), vs in per_batch.items():
        if kind == "input":
            vs = [math.sqrt(sum(vs))]
        elif kind == "rms":
            vs = [math.sqrt(vs[0])]
        collected.setdefault((name, kind), []).extend(vs)
    for (name, kind), vs in collected.items():
        # input gradients: mean over all batches (a batch where none arrived counts as zero)
        denominator = batches if kind == "input" else len(vs)
        out.setdefault(name, {})[kind] = sum(vs) / denominator
    out["loss"] = sum(losses) / len(losses)
    return out


def l2_norm(t: torch.Tensor, nonzero: bool = True) -> torch.Tensor | float:
    """The L2 norm, without overflow or underflow, and without a host sync on accelerators.

    A float32 sum of squares overflows past a norm of ~1e19 (exploding networks) and underflows
    to 0 below ~1e-19 per element (vanishing ones). On the CPU the norm is taken in the tensor's
    dtype, returned as a float, and redone in float64 only when it comes out 0 or inf (a float64
    norm is ~10× slower there; ``nonzero=False`` says a 0 is known to be true). On accelerators
    it is a float64 tensor, widened inside the one reduction.
    """
    if t.device.type != "cpu":
        return torch.linalg.vector_norm(t, dtype=torch.float64)
    v = torch.linalg.vector_norm(t).item()
    if t.dtype != torch.float64 and (math.isinf(v) or (v == 0 and nonzero)):
        v = torch.linalg.vector_norm(t, dtype=torch.float64).item()
    return v


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

    Forward hooks on the layers record the call order and output norms and put a gradient hook
    on each layer's input tensor. A post-accumulate hook on every parameter reads the weight
    gradient (mean |grad|, norm) the moment it is complete and then drops it, so the report holds
    one gradient at a time beside the user's own (which ``_no_trace`` keeps aside).
    """

    def __init__(
        self, layers: Mapping[str, nn.Module], weights: Mapping[str, torch.Tensor], model: nn.Module, sink: Sink
    ) -> None:
        self.layers = layers
        self.sink = sink
        self.batch = 0
        self.called: dict[str, int] = {}  # name -> index of first call
        self._weight_names: dict[int, list[str]] = {}
        for name, w in weights.items():
            self._weight_names.setdefault(id(w), []).append(name)
        self._params: list[torch.Tensor] = [
            p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad
        ]
        for w in weights.values():
            if w.requires_grad and all(w is not p for p in self._params):
                self._params.append(w)
        self._tensors: dict[int, tuple[torch.Tensor, list[str]]] = {}
        self._handles: list[Any] = []

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        handles = self._handles
        try:
            for name, m in self.layers.items():
                handles.append(m.register_forward_hook(self._forward_hook(name), with_kwargs=True))
            for p in self._params:
                handles.append(p.register_post_accumulate_grad_hook(self._weight_hook))
            yield
        finally:
            for h in handles:
                h.remove()
            handles.clear()
            self._tensors.clear()

    def _forward_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if name not in self.called:
                self.called[name] = len(self.called)
            out = output if isinstance(output, torch.Tensor) else first_tensor(output)
            if out is not None and out.is_floating_point() and out.numel():
                self.sink.add(("act", name, self.batch, out.numel()), l2_norm(out.detach()))
            x = args[0] if args and isinstance(args[0], torch.Tensor) else first_tensor((args, kwargs))
            if x is None or not x.requires_grad:
                return
            entry = self._tensors.get(id(x))
            if entry is not None and entry[0] is x:
                if name not in entry[1]:
                    entry[1].append(name)
                return
            names = [name]
            self._tensors[id(x)] = (x, names)  # the reference keeps the id from being reused
            self._handles.append(x.register_hook(self._grad_hook(names, self.batch)))

        return hook

    def _weight_hook(self, p: torch.Tensor) -> None:
        g = p.grad
        names = self._weight_names.get(id(p))
        if g is not None and names:  # (backward runs without grad mode: nothing here is recorded)
            mean_abs: torch.Tensor | float = g.abs().mean()  # the expression of the seed's print_gradients
            if g.device.type == "cpu":
                mean_abs = mean_abs.item()  # type: ignore[union-attr]
            norm = l2_norm(g, nonzero=not isinstance(mean_abs, float) or mean_abs != 0)
            for n in names:
                self.sink.add(("mean_abs", n, self.batch), mean_abs)
                self.sink.add(("grad_norm", n, self.batch), norm)
        p.grad = None

    def _grad_hook(self, names: list[str], batch: int) -> Callable:
        def hook(grad: torch.Tensor) -> None:
            norm = l2_norm(grad.detach())
            for n in names:
                self.sink.add(("input", n, batch), norm)

        return hook
