"""Beside the pipeline: the gradient-flow report of any ``nn.Module``, and the comparison of two.

``gradient_flow`` runs one forward and one backward per batch, exactly as the seed guide's
``print_gradients`` does (MSE between the output and zeros, unless told otherwise), and records
one :class:`LayerFlow` per parametric layer: every module with a direct ``weight`` parameter of
two or more dimensions (Linear, ConvNd, Embedding, …), in the order of their first forward call,
plus each bare parameter that resify inserted (the ``rezero``/``layerscale`` gates, kind "Gate").
``compare`` matches the layers of two reports by name (``resify.apply`` keeps the names).

The verdict
-----------
The *flow* at a layer is the L2 norm of the gradient arriving at its input (``input_grad_norm``:
the whole gradient of the loss with respect to that tensor, through the layer and any shortcut
around it, so it stays informative where a gate is zero); where a layer's input carries no
gradient (integer token ids) its weight-gradient norm stands in. Flows are compared with the flow
at the last original layer, the one nearest the loss:

====================  =========================================================================
``'exploding'``       any gradient is not finite, or some flow exceeds ``ABS_EXPLODING`` (1e6),
                      or flow(first) / flow(last) > ``EXPLODING_RATIO`` (1e3)
``'vanishing'``       flow(first) / flow(last) < ``VANISHING_RATIO`` (1e-2), or the first layer's
                      flow is below ``ABS_VANISHING`` (1e-10)
``'healthy'``         otherwise
====================  =========================================================================

The first/last rule is judged on layers the model had (``added`` ones are left out); a layer's own
verdict applies the same thresholds to its flow ÷ the last layer's. The bounds are asymmetric on
purpose: gradients that shrink by two orders of magnitude already starve the first layers, while
growth towards the input is normal in residual networks without zero-initialised branches
(torchvision's ResNet-50 at initialisation, in training mode, measures about 150×). A rezero-gated
network at ``alpha = 0`` is the identity, so its flow is flat and it counts as healthy even though
its layers' weight gradients are zero.

The recommendation
------------------
A plain 'vanishing' network is told to add shortcuts: ``shortcut='auto'`` (the seed's ungated
pattern) below ``DEEP_LAYERS`` (32) layers, ``gate='rezero'`` from there on; a shortcut network that
is 'vanishing' is told to put a shortcut around every layer; an 'exploding' one is told to gate its
branches at zero. The depth rule comes from benchmarks/efficacy_digits.py: from 32 layers up,
ungated shortcuts train to lower accuracy than rezero-gated ones for every activation measured
(tanh at 100 layers: 93.6% against 97.3%), though their gradients look 'healthy' at initialisation.

Statistics over ``batches > 1`` are the arithmetic means of the per-batch figures.

JSON schema (``schema_version`` 1)
----------------------------------
``GradientFlow.to_json()``::

    {"schema_version": 1, "kind": "resify.gradient_flow", "model_class": str, "loss": str,
     "batches": int, "seed": int, "loss_value": float, "verdict": str, "reason": str,
     "recommendation": str | null, "first_to_last": float | null,
     "thresholds": {"vanishing_ratio": .., "exploding_ratio": .., "abs_vanishing": .., "abs_exploding": ..},
     "layers": [{"name": str, "kind": str, "depth": int, "added": bool, "shape": [int, ...],
                 "mean_abs_grad": float | null, "grad_norm": float | null,
                 "grad_to_weight": float | null, "input_grad_norm": float | null,
                 "activation_rms": float | null, "verdict": str}, ...]}

``FlowComparison.to_json()``::

    {"schema_version": 1, "kind": "resify.flow_comparison", "headline": str,
     "first_layer_ratio": float | null, "before": <gradient_flow>, "after": <gradient_flow>,
     "layers": [{"name", "kind", "before_mean_abs_grad", "after_mean_abs_grad", "ratio",
                 "before_input_grad_norm", "after_input_grad_norm", "input_ratio"}, ...],
     "added": [str, ...], "removed": [str, ...]}

``null`` means "not measured" (no gradient reached it, or a gate has no input); infinities and
NaN are written as the strings "inf", "-inf" and "nan". ``GradientFlow.from_json`` reads it back.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from . import render
from .analyze import NAMESPACE
from .errors import ResifyError
from .modules import Shortcut
from .render import fmt_number, fmt_times
from .trace import as_inputs, check_device, derive_example_input

__all__ = [
    "LayerFlow",
    "GradientFlow",
    "LayerChange",
    "FlowComparison",
    "gradient_flow",
    "compare",
    "REPORT_SCHEMA_VERSION",
    "VANISHING_RATIO",
    "EXPLODING_RATIO",
    "ABS_VANISHING",
    "ABS_EXPLODING",
    "DEEP_LAYERS",
]

REPORT_SCHEMA_VERSION = 1
#: flow(first) / flow(last) below this is 'vanishing'.
VANISHING_RATIO = 1e-2
#: flow(first) / flow(last) above this is 'exploding'.
EXPLODING_RATIO = 1e3
#: a first-layer flow below this is 'vanishing', whatever the ratio.
ABS_VANISHING = 1e-10
#: any flow above this is 'exploding', whatever the ratio.
ABS_EXPLODING = 1e6
#: a plain 'vanishing' network with this many layers or more is told to add gated shortcuts.
DEEP_LAYERS = 32

# ---------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class LayerFlow:
    """The gradient figures of one parametric layer (or one resify gate)."""

    name: str  # qualified module name, "layers.0.0"; for a gate the parameter's, "resify.layers_0_0.alpha"
    kind: str  # "Linear", "Conv2d", …, or "Gate"
    depth: int  # position in forward order, from 0, counting every record
    added: bool  # inserted by resify (under the "resify." namespace)
    shape: tuple[int, ...]  # of the weight (or gate)
    mean_abs_grad: float | None  # mean |grad| of the weight: the seed's print_gradients figure
    grad_norm: float | None  # L2 norm of the weight gradient
    grad_to_weight: float | None  # grad_norm / L2 norm of the weight (None where the weight is zero)
    input_grad_norm: float | None  # L2 norm of the gradient arriving at the layer's input
    activation_rms: float | None  # root mean square of the layer's output
    verdict: str = "healthy"

    @property
    def flow(self) -> float | None:
        """The figure the verdict is judged on: ``input_grad_norm``, else ``grad_norm``."""
        return self.input_grad_norm if self.input_grad_norm is not None else self.grad_norm

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "depth": self.depth,
            "added": self.added,
            "shape": list(self.shape),
            "mean_abs_grad": _jnum(self.mean_abs_grad),
            "grad_norm": _jnum(self.grad_norm),
            "grad_to_weight": _jnum(self.grad_to_weight),
            "input_grad_norm": _jnum(self.input_grad_norm),
            "activation_rms": _jnum(self.activation_rms),
            "verdict": self.verdict,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerFlow:
        return cls(
            name=d["name"],
            kind=d["kind"],
            depth=int(d["depth"]),
            added=bool(d["added"]),
            shape=tuple(d["shape"]),
            mean_abs_grad=_pnum(d["mean_abs_grad"]),
            grad_norm=_pnum(d["grad_norm"]),
            grad_to_weight=_pnum(d["grad_to_weight"]),
            input_grad_norm=_pnum(d["input_grad_norm"]),
            activation_rms=_pnum(d["activation_rms"]),
            verdict=d["verdict"],
        )


@dataclass(frozen=True)
class GradientFlow:
    """How the gradient flows through a model: one :class:`LayerFlow` per layer, and a verdict."""

    model_class: str
    layers: tuple[LayerFlow, ...]
    verdict: str  # 'healthy', 'vanishing' or 'exploding'
    reason: str  # one line: the figure the verdict rests on
    recommendation: str | None  # one line, for 'vanishing' and 'exploding'
    first_to_last: float | None  # flow(first) / flow(last) over the model's own layers
    loss: str  # "mse to zeros", "mse to target", "cross-entropy to target" or "loss_fn"
    loss_value: float
    batches: int = 1
    seed: int = 0

    def layer(self, name: str) -> LayerFlow:
        """The record called ``name``; raises ResifyError listing some names when there is none."""
        for rec in self.layers:
            if rec.name == name:
                return rec
        known = ", ".join(r.name for r in self.layers[:8]) + (", …" if len(self.layers) > 8 else "")
        raise ResifyError(f"no layer named '{name}' in this report; expected one of {known}")

    def to_dict(self) -> dict:
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "kind": "resify.gradient_flow",
            "model_class": self.model_class,
            "loss": self.loss,
            "batches": self.batches,
            "seed": self.seed,
            "loss_value": _jnum(self.loss_value),
            "verdict": self.verdict,
            "reason": self.reason,
            "recommendation": self.recommendation,
            "first_to_last": _jnum(self.first_to_last),
            "thresholds": _thresholds(),
            "layers": [r.to_dict() for r in self.layers],
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON (schema in this module's docstring)."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GradientFlow:
        _check_schema(d, "resify.gradient_flow")
        return cls(
            model_class=d["model_class"],
            layers=tuple(LayerFlow.from_dict(r) for r in d["layers"]),
            verdict=d["verdict"],
            reason=d["reason"],
            recommendation=d["recommendation"],
            first_to_last=_pnum(d["first_to_last"]),
            loss=d["loss"],
            loss_value=_pnum(d["loss_value"]),
            batches=int(d["batches"]),
            seed=int(d["seed"]),
        )

    @classmethod
    def from_json(cls, text: str) -> GradientFlow:
        """Read back what :meth:`to_json` wrote."""
        return cls.from_dict(_loads(text))

    def summary(self) -> str:
        """One line: verdict, why, and what to try."""
        out = f"{self.verdict}: {self.reason}"
        return out + (f"; {self.recommendation}" if self.recommendation else "")

    def to_text(self, width: int = 100) -> str:
        """An aligned table for a terminal, ``width`` columns at most."""
        return render.flow_text(self, width)

    def to_markdown(self) -> str:
        """A Markdown section: verdict, recommendation and the table with every figure."""
        return render.flow_markdown(self)

    def plot(self, path: str | Path) -> Path:
        """Draw the flow against depth (log scale, bands shaded) into a .png or .svg file."""
        return render.plot_flows([("", self)], path, title=f"{self.model_class}: {self.summary()}")

    def __str__(self) -> str:
        return self.to_text()


@dataclass(frozen=True)
class LayerChange:
    """One layer present before and after: both records and the ratios after ÷ before."""

    before: LayerFlow
    after: LayerFlow

    @property
    def name(self) -> str:
        return self.after.name

    @property
    def ratio(self) -> float | None:
        """after ÷ before of ``mean_abs_grad`` (None where it is undefined)."""
        return _ratio(self.after.mean_abs_grad, self.before.mean_abs_grad)

    @property
    def input_ratio(self) -> float | None:
        """after ÷ before of ``input_grad_norm``."""
        return _ratio(self.after.input_grad_norm, self.before.input_grad_norm)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.after.kind,
            "before_mean_abs_grad": _jnum(self.before.mean_abs_grad),
            "after_mean_abs_grad": _jnum(self.after.mean_abs_grad),
            "ratio": _jnum(self.ratio),
            "before_input_grad_norm": _jnum(self.before.input_grad_norm),
            "after_input_grad_norm": _jnum(self.after.input_grad_norm),
            "input_ratio": _jnum(self.input_ratio),
        }


@dataclass(frozen=True)
class FlowComparison:
    """Two gradient-flow reports side by side, layers matched by name."""

    before: GradientFlow
    after: GradientFlow
    layers: tuple[LayerChange, ...]  # in the order of ``before``
    added: tuple[LayerFlow, ...]  # only in ``after`` (resify's projections and gates)
    removed: tuple[str, ...]  # only in ``before``
    headline: str  # "first layer: 412× more gradient; verdict vanishing → healthy"
    first_layer_ratio: float | None = field(default=None)  # mean_abs_grad after ÷ before, first layer

    def to_dict(self) -> dict:
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "kind": "resify.flow_comparison",
            "headline": self.headline,
            "first_layer_ratio": _jnum(self.first_layer_ratio),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "layers": [c.to_dict() for c in self.layers],
            "added": [r.name for r in self.added],
            "removed": list(self.removed),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The comparison as JSON (schema in this module's docstring)."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> FlowComparison:
        """Rebuild a comparison from :meth:`to_json` output (it is recomputed from both reports)."""
        d = _loads(text)
        _check_schema(d, "resify.flow_comparison")
        return compare(GradientFlow.from_dict(d["before"]), GradientFlow.from_dict(d["after"]))

    def to_text(self, width: int = 100) -> str:
        """Headline, both verdicts, and before/after/ratio per layer, ``width`` columns at most."""
        return render.comparison_text(self, width)

    def to_markdown(self) -> str:
        return render.comparison_markdown(self)

    def plot(self, path: str | Path) -> Path:
        """Draw both flows against depth (log scale, bands shaded) into a .png or .svg file."""
        return render.plot_flows(
            [("before", self.before), ("after", self.after)], path, title=f"{self.before.model_class}: {self.headline}"
        )

    def __str__(self) -> str:
        return self.to_text()


# ---------------------------------------------------------------------------------------------
# measuring


def gradient_flow(
    model: nn.Module,
    example_input: Any = None,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    target: torch.Tensor | None = None,
    batches: int = 1,
    seed: int = 0,
    example_kwargs: dict[str, Any] | None = None,
) -> GradientFlow:
    """Measure the gradient flow of ``model`` with one forward and backward per batch.

    Args:
        model: any ``nn.Module``; it is left exactly as it was (gradients, buffers, modes, hooks,
            and the global random state too).
        example_input: a tensor or tuple of tensors (the forward's positional arguments); derived
            when the first layer is an nn.Linear.
        loss_fn: ``loss_fn(output) -> scalar``. Default: MSE between each floating-point output
            tensor and zeros, summed over the outputs (the seed's ``print_gradients``).
        target: instead of ``loss_fn``: cross-entropy for an integer tensor of class indices,
            MSE otherwise. It is reused for every batch.
        batches: average the figures over this many batches: the example itself, then standard
            normal (or, for integer inputs, uniform between the example's min and max) tensors of
            its shapes drawn from a generator seeded with ``seed``.
        seed: seeds that generator and, inside the call only, the random state (dropout masks).
        example_kwargs: inputs passed by name (an attention mask), the same for every batch.

    Returns:
        A frozen :class:`GradientFlow`; print it, or call ``to_text``/``to_markdown``/``to_json``/``plot``.

    Raises:
        ResifyError: bad arguments (an input on another device than the model too), no parametric
            layer, no gradient, or a loss that is not a scalar.
    """
    if loss_fn is not None and target is not None:
        raise ResifyError("pass either loss_fn= or target=, not both; loss_fn(output) may use the target itself")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ResifyError(f"batches must be a positive integer, found {batches!r}")
    inputs = as_inputs(example_input) if example_input is not None else derive_example_input(model)
    if not any(isinstance(t, torch.Tensor) for t in inputs):
        raise ResifyError("example_input holds no tensor; pass e.g. example_input=torch.randn(8, 3, 32, 32)")
    check_device(model, inputs)
    layer_modules = _layer_modules(model)
    gates = _gate_parameters(model)
    if not layer_modules and not gates:
        raise ResifyError(
            f"{type(model).__name__} has no parametric layer (a module with a weight of 2 or more "
            "dimensions, such as nn.Linear or nn.Conv2d); nothing to report"
        )
    loss_name = (
        "loss_fn"
        if loss_fn is not None
        else (
            "mse to zeros"
            if target is None
            else ("mse to target" if target.is_floating_point() or target.is_complex() else "cross-entropy to target")
        )
    )
    weights = {name: _stored_weight(m) for name, m in layer_modules.items()}
    weights.update(gates)
    sink = _Sink()
    probe = _Probe(layer_modules, weights, model, sink)
    with _no_trace(model, inputs, seed):
        for batch in _batch_inputs(inputs, batches, seed):
            for p in model.parameters():
                p.grad = None
            with probe.recording():
                output = _forward(model, batch, example_kwargs or {})
                loss = _loss(output, loss_fn, target)
                if not loss.requires_grad:
                    raise ResifyError(
                        f"the loss of {type(model).__name__} does not depend on any parameter that requires "
                        "grad; unfreeze some (requires_grad=True) or pass a loss_fn that uses the output"
                    )
                loss.backward()
            sink.add(("loss",), loss.detach())
            probe.batch += 1
        with torch.no_grad():
            for name, w in weights.items():
                sink.add(("weight", name), _norm(w))
        figures = _combine(sink.resolve(), batches)
    got_grad = {name for name, fig in figures.items() if isinstance(fig, dict) and "mean_abs" in fig}
    order = _order(model, layer_modules, gates, probe.called, got_grad)
    records = []
    for depth, name in enumerate(order):
        fig = figures.get(name, {})
        gnorm, wnorm = fig.get("grad_norm"), fig.get("weight")
        records.append(
            LayerFlow(
                name=name,
                kind="Gate" if name in gates else _kind(layer_modules[name]),
                depth=depth,
                added=_is_added(name),
                shape=tuple(weights[name].shape),
                mean_abs_grad=fig.get("mean_abs"),
                grad_norm=gnorm,
                grad_to_weight=None if gnorm is None or not wnorm else gnorm / wnorm,
                input_grad_norm=fig.get("input"),
                activation_rms=fig.get("rms"),
            )
        )
    if all(r.flow is None for r in records):
        raise ResifyError(
            f"no gradient reached any layer of {type(model).__name__}; check that the loss depends on "
            "the output and that the parameters have requires_grad=True"
        )
    return _judge(
        tuple(records),
        model_class=type(model).__name__,
        loss=loss_name,
        loss_value=figures["loss"],
        batches=batches,
        seed=seed,
    )


def _is_added(name: str) -> bool:
    return NAMESPACE in name.split(".")


def _stored_weight(m: nn.Module) -> torch.Tensor | None:
    """The parameter that holds a module's weight: ``weight`` itself, or where the weight is computed
    (a parametrization, old-style ``weight_norm``/``spectral_norm``) the tensor it is computed from."""
    w = m._parameters.get("weight")
    if w is None and parametrize.is_parametrized(m, "weight"):
        w = max(m.parametrizations.weight.parameters(), key=lambda p: (p.dim(), p.numel()), default=None)
    if w is None:
        w = m._parameters.get("weight_orig", m._parameters.get("weight_v"))
    if isinstance(w, torch.Tensor) and w.dim() >= 2 and w.is_floating_point():
        return w
    return None


def _kind(m: nn.Module) -> str:
    """The layer's class name ("Linear" for a parametrized Linear too)."""
    cls = type(m)
    return cls.__bases__[0].__name__ if parametrize.is_parametrized(m) and cls.__bases__ else cls.__name__


def _layer_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules with a weight of two or more dimensions (stored or parametrized), by qualified name."""
    return {name: m for name, m in model.named_modules() if _stored_weight(m) is not None}


def _gate_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Bare parameters resify inserted (gates): owned by a Shortcut (or a plain container) under the namespace."""
    found: dict[str, torch.Tensor] = {}
    for mname, m in model.named_modules():
        if not (type(m) is nn.Module or isinstance(m, Shortcut)) or not _is_added(mname):
            continue
        for pname, p in m._parameters.items():
            if p is not None:
                found[f"{mname}.{pname}"] = p
    return found


class _Sink:
    """Measured scalars under keys; read back to the host all at once (one copy per device)."""

    def __init__(self) -> None:
        self.items: list[tuple[tuple, torch.Tensor | float]] = []

    def add(self, key: tuple, value: torch.Tensor | float) -> None:
        if type(value) is not float and value.device.type == "cpu":  # type: ignore[union-attr]
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


def _combine(items: list[tuple[tuple, float]], batches: int) -> dict:
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


def _norm(t: torch.Tensor, nonzero: bool = True) -> torch.Tensor | float:
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


def _first_tensor(args: Any) -> torch.Tensor | None:
    if isinstance(args, torch.Tensor):
        return args
    if isinstance(args, Mapping):
        args = list(args.values())
    if isinstance(args, (tuple, list)):
        for a in args:
            t = _first_tensor(a)
            if t is not None:
                return t
    return None


class _Probe:
    """The hooks that measure one forward and backward.

    Forward hooks on the layers record the call order and output norms and put a gradient hook
    on each layer's input tensor. A post-accumulate hook on every parameter reads the weight
    gradient (mean |grad|, norm) the moment it is complete and then drops it, so the report holds
    one gradient at a time beside the user's own (which ``_no_trace`` keeps aside).
    """

    def __init__(
        self, layers: Mapping[str, nn.Module], weights: Mapping[str, torch.Tensor], model: nn.Module, sink: _Sink
    ) -> None:
        self.layers = layers
        self.sink = sink
        self.batch = 0
        self.called: dict[str, int] = {}  # name -> index of first call
        self._weight_names: dict[int, list[str]] = {}
        for name, w in weights.items():
            self._weight_names.setdefault(id(w), []).append(name)
        self._params = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]
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
            out = output if isinstance(output, torch.Tensor) else _first_tensor(output)
            if out is not None and out.is_floating_point() and out.numel():
                self.sink.add(("act", name, self.batch, out.numel()), _norm(out.detach()))
            x = args[0] if args and isinstance(args[0], torch.Tensor) else _first_tensor((args, kwargs))
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
            norm = _norm(g, nonzero=not isinstance(mean_abs, float) or mean_abs != 0)
            for n in names:
                self.sink.add(("mean_abs", n, self.batch), mean_abs)
                self.sink.add(("grad_norm", n, self.batch), norm)
        p.grad = None

    def _grad_hook(self, names: list[str], batch: int) -> Callable:
        def hook(grad: torch.Tensor) -> None:
            norm = _norm(grad.detach())
            for n in names:
                self.sink.add(("input", n, batch), norm)

        return hook


def _order(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    gates: Mapping[str, torch.Tensor],
    called: Mapping[str, int],
    got_grad: set[str],
) -> list[str]:
    """Record names in forward order: layers by first call, each gate after the layer it follows.

    Gates are placed by the position of their get_attr node in the graph of the GraphModule that
    holds them. A layer that was never called but whose weight received a gradient (used by its
    parent, as nn.MultiheadAttention uses out_proj.weight) comes after every called layer; one
    with neither is left out.
    """
    inf = float("inf")
    keys: dict[str, tuple] = {}
    for i, name in enumerate(layers):
        if name in called:
            keys[name] = (called[name], 0, 0)
        elif name in got_grad:
            keys[name] = (inf, 0, i)
    gate_anchor = _gate_anchors(model, set(gates), set(called))
    for k, name in enumerate(gates):
        anchor = gate_anchor.get(name, ...)
        if anchor is ...:
            keys[name] = (inf, 2, k)
        else:
            keys[name] = (called[anchor] if anchor is not None else -1, 2, k)
    return sorted(keys, key=keys.__getitem__)


def _gate_anchors(model: nn.Module, gates: set[str], called: set[str]) -> dict[str, str | None]:
    """gate name -> the last called layer before its get_attr node (None: before every layer)."""
    anchors: dict[str, str | None] = {}
    if not gates:
        return anchors
    for prefix, gm in model.named_modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        dot = f"{prefix}." if prefix else ""
        last: str | None = None
        for n in gm.graph.nodes:
            qual = f"{dot}{n.target}"
            if n.op == "call_module" and qual in called:
                last = qual
            elif n.op == "get_attr" and qual in gates and qual not in anchors:
                anchors[qual] = last
    return anchors


@contextlib.contextmanager
def _no_trace(model: nn.Module, inputs: tuple[Any, ...], seed: int) -> Iterator[None]:
    """Run the measurement, then put back every gradient, buffer, mode and the random state."""
    params = list({id(p): p for p in model.parameters()}.values())
    grads = [p.grad for p in params]
    buffers = [(b, b.clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    devices = sorted(
        {
            t.device.index or 0
            for t in [*params, *[b for b, _ in buffers], *inputs]
            if isinstance(t, torch.Tensor) and t.device.type == "cuda"
        }
    )
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.default_generator.manual_seed(seed)
            for d in devices:
                torch.cuda.default_generators[d].manual_seed(seed)
            yield
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)
        for m, training in modes:
            m.training = training


def _batch_inputs(inputs: tuple[Any, ...], batches: int, seed: int) -> Iterator[tuple[Any, ...]]:
    """The example (detached, floating tensors requiring grad), then random batches of its shapes."""
    gen = torch.Generator().manual_seed(seed)

    def prepare(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            t = t.detach()
            return t.requires_grad_() if t.is_floating_point() else t
        return t

    def draw(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point() or t.is_complex():
            r = torch.randn(t.shape, generator=gen, dtype=t.dtype)
        elif t.dtype == torch.bool:
            r = torch.randint(0, 2, t.shape, generator=gen).bool()
        elif t.numel():
            r = torch.randint(int(t.min()), int(t.max()) + 1, t.shape, generator=gen, dtype=t.dtype)
        else:
            r = t.detach().clone().cpu()
        return prepare(r.to(t.device))

    yield tuple(prepare(t) for t in inputs)
    for _ in range(batches - 1):
        yield tuple(draw(t) for t in inputs)


def _forward(model: nn.Module, batch: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        return model(*batch, **kwargs)
    except ResifyError:
        raise
    except Exception as e:
        shapes = ", ".join(str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in batch)
        first = (str(e).strip().splitlines() or [""])[0]
        raise ResifyError(
            f"{type(model).__name__} failed on the example input ({shapes}): {type(e).__name__}: {first}; "
            "pass an example_input of the shape and dtype the model expects"
        ) from e


def _output_tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() or output.is_complex() else []
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _output_tensors(o)]
    return []


def _loss(output: Any, loss_fn: Callable[[Any], torch.Tensor] | None, target: torch.Tensor | None) -> torch.Tensor:
    """The scalar to differentiate (see ``gradient_flow``)."""
    if loss_fn is not None:
        loss = loss_fn(output)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            found = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ResifyError(f"loss_fn must return a scalar tensor, found {found}; reduce it, e.g. with .mean()")
        return loss.reshape(())
    tensors = _output_tensors(output)
    if not tensors:
        raise ResifyError(
            f"the model's output ({type(output).__name__}) holds no floating-point tensor to differentiate; "
            "pass loss_fn=lambda out: ... that returns a scalar"
        )
    if target is None:
        # exactly print_gradients: nn.MSELoss()(output, torch.zeros_like(output)), summed over outputs
        total = F.mse_loss(tensors[0], torch.zeros_like(tensors[0]))
        for t in tensors[1:]:
            total = total + F.mse_loss(t, torch.zeros_like(t))
        return total
    if len(tensors) != 1:
        raise ResifyError(
            f"target= needs a model with one output tensor, found {len(tensors)}; "
            "pass loss_fn=lambda out: ... to combine them"
        )
    out = tensors[0]
    misfit = (
        f"the target {tuple(target.shape)} ({target.dtype}) does not fit the output {tuple(out.shape)}; "
        "pass integer class indices [N] or a float tensor of the output's shape"
    )
    if target.is_floating_point() or target.is_complex():
        if target.shape != out.shape:
            raise ResifyError(misfit)
        return F.mse_loss(out, target.to(out.device))
    try:
        return F.cross_entropy(out, target.to(out.device))
    except (RuntimeError, ValueError, IndexError) as e:
        raise ResifyError(misfit) from e


# ---------------------------------------------------------------------------------------------
# judging (pure)


def _layer_verdict(rec: LayerFlow, last: float | None) -> str:
    figures = [rec.mean_abs_grad, rec.grad_norm, rec.input_grad_norm, rec.activation_rms]
    if any(x is not None and not math.isfinite(x) for x in figures):
        return "exploding"
    flow = rec.flow
    if rec.kind == "Gate" or flow is None:
        return "healthy"
    if flow > ABS_EXPLODING or (last and flow / last > EXPLODING_RATIO):
        return "exploding"
    if last and flow / last < VANISHING_RATIO:
        return "vanishing"
    return "healthy"


def _judge(records: tuple[LayerFlow, ...], **fields: Any) -> GradientFlow:
    """Attach per-layer and overall verdicts, the reason and the recommendation."""
    own = [r for r in records if not r.added and r.kind != "Gate" and r.input_grad_norm is not None]
    if not own:  # no layer input carries a gradient (token ids into embeddings only): weight gradients
        own = [r for r in records if not r.added and r.kind != "Gate" and r.flow is not None]
    last = own[-1].flow if own else None
    layers = tuple(replace(r, verdict=_layer_verdict(r, last)) for r in records)
    first = own[0].flow if own else None
    ratio = first / last if first is not None and last else None
    figures = [
        x for r in records for x in (r.mean_abs_grad, r.grad_norm, r.input_grad_norm, r.activation_rms) if x is not None
    ]
    flows = [r.flow for r in records if r.flow is not None and r.kind != "Gate"]
    where = f"from '{own[0].name}' to '{own[-1].name}'" if own else ""
    if any(not math.isfinite(x) for x in figures):
        bad = next(
            r.name
            for r in records
            if any(
                x is not None and not math.isfinite(x)
                for x in (r.mean_abs_grad, r.grad_norm, r.input_grad_norm, r.activation_rms)
            )
        )
        verdict, reason = "exploding", f"a gradient or activation is not finite at '{bad}'"
    elif ratio is not None and ratio > EXPLODING_RATIO:
        verdict, reason = "exploding", f"input gradient grows {fmt_times(ratio)} (> {EXPLODING_RATIO:g}×) {where}"
    elif flows and max(flows) > ABS_EXPLODING:
        verdict, reason = "exploding", f"a gradient norm reaches {fmt_number(max(flows))} (> {ABS_EXPLODING:g})"
    elif first is not None and first < ABS_VANISHING:
        verdict, reason = "vanishing", f"the first layer's input gradient is {fmt_number(first)} (< {ABS_VANISHING:g})"
    elif ratio is not None and ratio < VANISHING_RATIO:
        verdict, reason = (
            "vanishing",
            f"input gradient first/last = {fmt_number(ratio)} (< {VANISHING_RATIO:g}) {where}",
        )
    else:
        shown = fmt_number(ratio) if ratio is not None else "n/a"
        verdict, reason = (
            "healthy",
            (f"input gradient first/last = {shown} (within {VANISHING_RATIO:g}…{EXPLODING_RATIO:g}) {where}"),
        )
    return GradientFlow(
        layers=layers,
        verdict=verdict,
        reason=reason.strip(),
        recommendation=_recommend(verdict, layers),
        first_to_last=ratio,
        **fields,
    )


def _recommend(verdict: str, layers: Sequence[LayerFlow]) -> str | None:
    shortcuts = any(r.added for r in layers)
    gated = any(r.kind == "Gate" for r in layers)
    if verdict == "vanishing":
        depth = sum(1 for r in layers if not r.added and r.kind != "Gate")
        if not shortcuts and depth >= DEEP_LAYERS:
            return (
                f"try gate='rezero': resify.apply(model, gate='rezero') adds a shortcut around every layer "
                f"and starts each branch at zero, which trains {depth} layers in series more reliably "
                "than ungated shortcuts"
            )
        if not shortcuts:
            return "try shortcut='auto': resify.apply(model, shortcut='auto') adds a shortcut around every layer"
        return "try shortcut='auto' with group=1 so that every layer, not only some, gets a shortcut"
    if verdict == "exploding":
        if gated:
            return "try a smaller gate_init (gate='rezero' with gate_init=0 starts every branch at zero)"
        return "try gate='rezero': resify.apply(model, gate='rezero') starts every branch at zero"
    return None


# ---------------------------------------------------------------------------------------------
# comparing (pure)


def compare(before: GradientFlow, after: GradientFlow) -> FlowComparison:
    """Match the layers of two reports by name; ratios are after ÷ before.

    The headline compares the first layer the two share: its ``mean_abs_grad`` (the seed's
    figure), or its input-gradient norm where a weight gradient is zero (a gate at zero).
    """
    if not isinstance(before, GradientFlow) or not isinstance(after, GradientFlow):
        raise ResifyError(
            f"compare takes two GradientFlow reports, found {type(before).__name__} and "
            f"{type(after).__name__}; make them with resify.gradient_flow(model, x)"
        )
    by_name = {r.name: r for r in after.layers}
    changes = tuple(LayerChange(r, by_name[r.name]) for r in before.layers if r.name in by_name)
    seen = {r.name for r in before.layers}
    added = tuple(r for r in after.layers if r.name not in seen)
    removed = tuple(r.name for r in before.layers if r.name not in by_name)
    first = next((c for c in changes if c.before.kind != "Gate"), None)
    ratio = first.ratio if first is not None else None
    verdicts = f"verdict {before.verdict} → {after.verdict}"
    if first is None:
        headline = f"no layer in common; {verdicts}"
    elif ratio is not None and ratio > 0 and math.isfinite(ratio):
        headline = f"first layer: {_change(ratio)} gradient; {verdicts}"
    elif first.input_ratio is not None and first.input_ratio > 0 and math.isfinite(first.input_ratio):
        headline = f"first layer: {_change(first.input_ratio)} input gradient; {verdicts}"
    else:
        b, a = first.before.mean_abs_grad, first.after.mean_abs_grad
        headline = f"first layer: mean |grad| {fmt_number(b)} → {fmt_number(a)}; {verdicts}"
    return FlowComparison(
        before=before,
        after=after,
        layers=changes,
        added=added,
        removed=removed,
        headline=headline,
        first_layer_ratio=ratio,
    )


def _change(ratio: float) -> str:
    if ratio >= 1:
        return f"{fmt_times(ratio)} more"
    return f"{fmt_times(1 / ratio)} less"


# ---------------------------------------------------------------------------------------------
# rendering


def _ratio(a: float | None, b: float | None) -> float | None:
    """a ÷ b, or None where either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def _jnum(x: float | None) -> float | str | None:
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _pnum(x: Any) -> float | None:
    return None if x is None else float(x)


def _thresholds() -> dict[str, float]:
    return {
        "vanishing_ratio": VANISHING_RATIO,
        "exploding_ratio": EXPLODING_RATIO,
        "abs_vanishing": ABS_VANISHING,
        "abs_exploding": ABS_EXPLODING,
    }


def _loads(text: str) -> dict:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ResifyError(f"expected a resify report in JSON, found invalid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ResifyError(f"expected a JSON object, found {type(d).__name__}")
    return d


def _check_schema(d: Mapping[str, Any], kind: str) -> None:
    if d.get("kind") != kind or d.get("schema_version") != REPORT_SCHEMA_VERSION:
        raise ResifyError(
            f"expected a '{kind}' report of schema_version {REPORT_SCHEMA_VERSION}, found "
            f"kind={d.get('kind')!r} schema_version={d.get('schema_version')!r}; re-create it with this resify"
        )


# ---------------------------------------------------------------------------------------------
# plotting (matplotlib is optional: resify[plot])
