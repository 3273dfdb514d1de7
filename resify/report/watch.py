"""``resify.watch``: the gradient flow of a model while it trains, recorded every N-th backward.

Beside the pipeline, like ``report/``, of which it is the training-time twin: for every N-th
backward it attaches a ``report.probe.Probe`` (the hooks and figures of ``gradient_flow``),
keeps that step's raw figures, and builds them into the records of ``report.history`` with
``report.measure.build_flow`` (the records and verdict rules of ``gradient_flow``) when they are
asked for. Between records it costs two hooks on the model and one on its output per step.
"""

from __future__ import annotations

import math
import warnings
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import ResifyError, ResifyWarning
from .facts import gates_at_zero, model_facts
from .figures import Sink, combine
from .history import LOSS_NOT_SEEN, LOSS_SEEN, FlowHistory, StepFlow, VerdictTimeline
from .measure import build_flow
from .probe import Probe, as_leaf, find_layers, is_measuring
from .verdicts import judge_step

__all__ = ["watch", "Watch"]

#: the figures a GradScaler multiplies (the loss is scaled, so every gradient is); not the weight or activation.
_SCALED = ("mean_abs", "grad_norm", "input")


class _Scaler(Protocol):
    def get_scale(self) -> float: ...


def watch(model: nn.Module, every: int = 100, *, scaler: _Scaler | None = None, label: str | None = None) -> Watch:
    """Record the gradient flow of ``model`` at every ``every``-th backward pass while it trains.

    Use it as a context manager around the training loop, or call ``close()``::

        with resify.watch(model, every=10) as w:
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(); loss.backward(); opt.step()
        print(w.verdicts)             # from step 0: vanishing in 60 layers, 0–59 (…); …
        w.plot("flow.png")            # layers × steps heatmap, verdict band, gates over time

    Each recorded step is judged as ``gradient_flow`` judges a model, and against the first recorded
    step: a step whose activation RMS grew past ``ACTIVATION_GROWTH``× it is 'exploding', and so is
    one whose loss, if you pass it (``w.record_loss(loss)``), is not finite or past ``LOSS_GROWTH``× it.

    Args:
        model: any ``nn.Module``, converted by resify or not; a ``DistributedDataParallel`` or
            ``DataParallel`` wrapper is looked through (each rank records its own backward).
        every: record the backward passes 0, every, 2·every, … counted from when the watch began.
        scaler: the ``torch.amp.GradScaler`` of an AMP loop: gradient figures are divided by
            the scale of that backward (recorded as ``StepFlow.scale``), and a step whose scaled
            gradients overflowed is marked ``overflow`` and left out of the verdicts.
        label: the run's name in plots and summaries (default: the model's class name).

    Returns:
        A :class:`Watch` whose hooks are on until ``close()`` or the end of the ``with`` block.

    Raises:
        ResifyError: ``every`` is not a positive integer, the model (or a submodule) is compiled
            with ``torch.compile`` (compiled code runs no hooks), or it has no parametric layer.
    """
    return Watch(model, every, scaler=scaler, label=label)


@dataclass
class _Raw:
    """One recorded backward before it is built into a StepFlow (built when first asked for)."""

    step: int
    called: dict[str, int]
    sink: Sink
    scale: float
    gates: array | torch.Tensor  # every gate's values in one row (the order of Watch.gates)
    loss: torch.Tensor | float | None = None  # the loss given to record_loss (None: not given)


class Watch:
    """The hooks of :func:`watch` and what they recorded: ``history``, ``verdicts``, ``plot``."""

    def __init__(
        self, model: nn.Module, every: int = 100, *, scaler: _Scaler | None = None, label: str | None = None
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ResifyError(f"every must be a positive integer (record every N-th backward), found {every!r}")
        model = _unwrap(model)
        self.model = model
        self.every = every
        self.scaler = scaler
        self.label = label or type(model).__name__
        self.modules, self.gates, self.weights = find_layers(model)
        self._facts = model_facts(model, self.gates)  # (the gates' values are each step's own)
        self._loss: torch.Tensor | float | None = None  # given for the step being recorded
        self.steps_seen = 0  # backward passes through the model's output since the watch began
        self.closed = False
        self._probe = Probe(self.modules, self.weights, keep_grads=True)
        self._armed = False  # the probe's hooks are on: this step is recorded
        self._scale = 1.0
        self._in_backward = False
        self._raw: list[_Raw] = []
        self._built: list[StepFlow] = []
        self._warned: set[str] = set()
        self._handles = [
            model.register_forward_pre_hook(self._before_forward),
            model.register_forward_hook(self._after_forward),
        ]

    # -- the user's side

    def close(self) -> None:
        """Take every hook off the model (its layers', its weights' and its own); records stay."""
        if self.closed:
            return
        self.closed = True
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._armed:
            self._probe.detach()
            self._armed = False
        if self.steps_seen == 0:
            warnings.warn(
                f"resify.watch saw no backward pass of {type(self.model).__name__}'s output, so it recorded nothing; "
                "was the model run through torch.compile (compiled code runs no hooks: watch the uncompiled "
                "model) or inside another module's forward only?",
                ResifyWarning,
                stacklevel=2,
            )

    def __enter__(self) -> Watch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def record_loss(self, loss: torch.Tensor | float) -> None:
        """Give the watch this step's loss (optional; before or after its backward): a recorded step
        then shows it, and one whose loss is not finite or above ``LOSS_GROWTH``× the first recorded
        step's is 'exploding'. Free between records; at a recorded step it keeps the value (no sync)."""
        value = loss.detach() if isinstance(loss, torch.Tensor) else float(loss)
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            raise ResifyError(f"record_loss takes the scalar loss, found a tensor of shape {tuple(value.shape)}")
        if self._armed:
            self._loss = value
        elif self._raw and self._raw[-1].step == self.steps_seen - 1 and self._raw[-1].loss is None:
            self._raw[-1].loss = value  # after the backward that closed the record

    @property
    def history(self) -> FlowHistory:
        """Every recorded step as a :class:`StepFlow` (the same figures and verdicts as gradient_flow)."""
        for raw in self._raw[len(self._built) :]:
            self._built.append(self._build(raw))
        return FlowHistory(
            model_class=type(self.model).__name__, label=self.label, every=self.every, records=tuple(self._built)
        )

    @property
    def verdicts(self) -> VerdictTimeline:
        """The verdict at each recorded step and the first step of each change (see ``FlowHistory.verdicts``)."""
        return self.history.verdicts

    def plot(self, path: str | Path, beside: Sequence[Watch | FlowHistory] = ()) -> Path:
        """Draw the heatmap of layers × steps, the verdict band and the gates (``.png`` or ``.svg``).

        ``beside``: other watches (or histories) drawn to the right on the same colour scale.
        """
        others = [b.history if isinstance(b, Watch) else b for b in beside]
        return self.history.plot(path, beside=others)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"<resify.watch of {type(self.model).__name__}, every {self.every}, {state}: "
            f"{self.steps_seen} backward(s) seen, {len(self._raw)} recorded>"
        )

    # -- the hooks

    def _before_forward(self, module: nn.Module, args: tuple) -> tuple | None:
        if not torch.is_grad_enabled() or is_measuring():
            return None
        if not self._armed and self.steps_seen % self.every == 0:
            self._probe.attach(Sink())
            self._armed, self._loss = True, None
        if not self._armed:
            return None
        # as gradient_flow does: the input is a leaf that requires grad, so the first layer's flow is measured
        return tuple(a if isinstance(a, torch.Tensor) and a.requires_grad else as_leaf(a) for a in args)

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if not torch.is_grad_enabled() or is_measuring():
            return
        tensors = _requiring_grad(output)
        if len(tensors) == 1:
            tensors[0].register_hook(self._backward_starts)
        elif tensors and hasattr(torch.autograd.graph, "register_multi_grad_hook"):
            torch.autograd.graph.register_multi_grad_hook(tensors, self._backward_starts, mode="any")
        elif tensors:
            tensors[0].register_hook(self._backward_starts)

    def _backward_starts(self, grad: Any) -> None:
        """The gradient reached the model's output: a backward has begun (once per backward)."""
        if self.closed or self._in_backward:
            return
        self._in_backward = True
        if self._armed:
            self._scale = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_ends)

    def _backward_ends(self) -> None:
        """At the end of the backward (before the optimizer step): close the record, if one was open."""
        self._in_backward = False
        step, probe = self.steps_seen, self._probe
        self.steps_seen += 1
        if not self._armed or self.closed:
            return
        self._armed = False
        probe.detach()
        if not probe.called:
            self._warn_once(
                "no-hooks",
                f"resify.watch: no layer of {type(self.model).__name__} ran its forward hook at step {step}, so "
                "nothing was recorded; do its layers run in compiled code (torch.compile)? watch the uncompiled model",
            )
            return
        try:
            self._raw.append(self._keep(step, probe))
        except Exception as e:  # a failing record must not fail the user's backward
            self._warn_once(
                "failed",
                f"resify.watch could not record step {step} ({type(e).__name__}: {e}); training goes on without it",
            )

    def _keep(self, step: int, probe: Probe) -> _Raw:
        """The step's figures, measured and packed (compactly: the keys shared with the step before)."""
        probe.finish()
        probe.add_weight_norms()
        last = self._raw[-1] if self._raw else None
        probe.sink.pack(last.sink.keys if last else ())
        called = last.called if last is not None and last.called == probe.called else probe.called
        gates: array | torch.Tensor = array("d")
        if self.gates:
            with torch.no_grad():
                flat = torch.cat([g.detach().reshape(-1) for g in self.gates.values()])
            gates = array("d", flat.tolist()) if flat.device.type == "cpu" else flat.clone()
        loss, self._loss = self._loss, None
        return _Raw(step, called, probe.sink, self._scale, gates, loss)

    # -- building the records

    def _split_gates(self, flat: list[float]) -> dict[str, tuple[float, ...]]:
        out, i = {}, 0
        for name, g in self.gates.items():
            out[name] = tuple(flat[i : i + g.numel()])
            i += g.numel()
        return out

    def _build(self, raw: _Raw) -> StepFlow:
        figures = combine(raw.sink.resolve(), 1)
        overflow = False
        for fig in figures.values():
            if not isinstance(fig, dict):
                continue
            for key in _SCALED:
                if key in fig:
                    fig[key] /= raw.scale  # a power of two: exact
                    overflow |= self.scaler is not None and not math.isfinite(fig[key])
        gates = self._split_gates(raw.gates.tolist())
        if raw.loss is not None:
            figures["loss"] = float(raw.loss)
        facts = replace(self._facts, gates_at_zero=gates_at_zero(gates))
        flow = build_flow(
            self.model,
            self.modules,
            self.gates,
            self.weights,
            raw.called,
            figures,
            facts=facts,
            loss=LOSS_NOT_SEEN if raw.loss is None else LOSS_SEEN,
        )
        start = next((r for r in self._built if not r.overflow), None)
        if not overflow:
            flow = judge_step(flow, start)
        return StepFlow(step=raw.step, flow=flow, gates=gates, scale=raw.scale, overflow=overflow)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, ResifyWarning, stacklevel=3)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module to hook: a (Distributed)DataParallel's ``.module``; compiled modules refused."""
    if not isinstance(model, nn.Module):
        raise ResifyError(f"watch takes an nn.Module, found {type(model).__name__}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    for name, m in model.named_modules():
        if hasattr(m, "_orig_mod") and type(m).__name__ == "OptimizedModule":
            where = f"its submodule '{name}'" if name else "it"
            raise ResifyError(
                f"resify.watch cannot record {type(model).__name__}: {where} is compiled with torch.compile, and "
                "compiled code runs no Python hooks; watch the uncompiled module (model, not torch.compile(model)) "
                "for the steps you want recorded"
            )
    return model


def _requiring_grad(output: Any) -> list[torch.Tensor]:
    """The output's tensors that carry a gradient back (a tensor, or those in a tuple, list or dict)."""
    if isinstance(output, torch.Tensor):
        return [output] if output.requires_grad else []
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for o in output for t in _requiring_grad(o)]
    return []
