"""``gradient_flow``: one forward and backward per batch, measured without a trace left behind.

It derives or checks the input, runs the batches under a ``probe.Probe``, puts back every
gradient, buffer, mode and the random state, and hands the figures to ``build_flow``, which
orders the records and has ``verdicts.judge`` judge them. ``resify.watch`` builds each step it
records with the same ``build_flow``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..constants import NAMESPACE
from ..errors import ResifyError
from ..formats import first_line
from ..planning.sites import Plan
from ..state import state_kept
from ..tracing.inputs import as_inputs, check_device, derive_example_input
from .facts import ModelFacts, model_facts
from .figures import Sink, combine
from .probe import Probe, as_leaf, find_layers, is_added, layer_kind, measuring
from .records import GradientFlow, LayerFlow
from .verdicts import judge

__all__ = ["gradient_flow", "build_flow"]


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
            and the global random state too). A ``DistributedDataParallel`` (or ``DataParallel``)
            model is run through the module it wraps, under the wrapper's names: its own forward
            would ready an all-reduce for the report's backward, and leave it pending for the next
            training step. The figures are this process's.
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
    if inputs is None or not any(isinstance(t, torch.Tensor) for t in inputs):
        raise ResifyError("example_input holds no tensor; pass e.g. example_input=torch.randn(8, 3, 32, 32)")
    check_device(model, inputs)
    modules, gates, weights = find_layers(model)
    loss_name = (
        "loss_fn"
        if loss_fn is not None
        else (
            "mse to zeros"
            if target is None
            else ("mse to target" if target.is_floating_point() or target.is_complex() else "cross-entropy to target")
        )
    )
    sink = Sink()
    probe = Probe(modules, weights, sink)
    wrapped = isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
    runner = model.module if wrapped else model
    assert isinstance(runner, nn.Module)
    with _no_trace(model, inputs, seed):
        for batch in _batch_inputs(inputs, batches, seed):
            with probe.recording():
                output = _forward(runner, batch, example_kwargs or {})
                loss = _loss(output, loss_fn, target)
                if not loss.requires_grad:
                    raise ResifyError(
                        f"the loss of {type(model).__name__} does not depend on any parameter that requires "
                        "grad; unfreeze some (requires_grad=True) or pass a loss_fn that uses the output"
                    )
                probe.backward(loss)
            sink.add(("loss",), loss.detach())
            probe.batch += 1
        probe.add_weight_norms()
        figures = combine(sink.resolve(), batches)
    facts = model_facts(model, gates)
    flow = build_flow(
        model, modules, gates, weights, probe.called, figures, facts=facts, loss=loss_name, batches=batches, seed=seed
    )
    if all(r.flow is None for r in flow.layers):
        raise ResifyError(
            f"no gradient reached any layer of {type(model).__name__}; check that the loss depends on "
            "the output and that the parameters have requires_grad=True"
        )
    return flow


def build_flow(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    gates: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    called: Mapping[str, int],
    figures: Mapping[str, Any],
    *,
    facts: ModelFacts,
    **fields: Any,
) -> GradientFlow:
    """One ``LayerFlow`` per layer and gate a probe saw, in forward order, judged by ``verdicts.judge``.

    ``figures`` is what ``probe.combine`` made of the sink (with "loss", the mean loss, or NaN
    where the loss was not seen); ``facts`` what the model has (``facts.model_facts``; its plans place
    the gates); ``fields`` are the report's other fields (``loss``, ``batches``, ``seed``).
    """
    got_grad = {name for name, fig in figures.items() if isinstance(fig, dict) and "mean_abs" in fig}
    order = _order(model, modules, gates, called, got_grad, facts.plans)
    records = []
    for depth, name in enumerate(order):
        fig = figures.get(name, {})
        gnorm, wnorm = fig.get("grad_norm"), fig.get("weight")
        records.append(
            LayerFlow(
                name=name,
                kind="Gate" if name in gates else layer_kind(modules[name]),
                depth=depth,
                added=is_added(name),
                shape=tuple(weights[name].shape),
                mean_abs_grad=fig.get("mean_abs"),
                grad_norm=gnorm,
                grad_to_weight=None if gnorm is None or not wnorm else gnorm / wnorm,
                input_grad_norm=fig.get("input"),
                activation_rms=fig.get("rms"),
                activation_similarity=fig.get("similarity"),
            )
        )
    return judge(
        tuple(records),
        facts=facts,
        model_class=type(model).__name__,
        loss_value=figures.get("loss", math.nan),
        **fields,
    )


def _order(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    gates: Mapping[str, torch.Tensor],
    called: Mapping[str, int],
    got_grad: set[str],
    plans: tuple[tuple[str, Plan], ...] = (),
) -> list[str]:
    """Record names in forward order: layers by first call, each gate after the layer it follows.

    Gates are placed by ``_gate_anchors`` (the graph of a GraphModule, else the applied plan). A layer that was never called but whose weight received a gradient (used by its
    parent, as nn.MultiheadAttention uses out_proj.weight) comes right after the nearest called
    module that contains it, or after every called layer where none does; one with neither is left
    out.
    """
    inf = float("inf")
    keys: dict[str, tuple] = {}
    for i, name in enumerate(layers):
        if name in called:
            keys[name] = (called[name], 0, 0)
        elif name in got_grad:
            owner = next((p for p in _ancestors(name) if p in called), None)
            keys[name] = (called[owner], 1, i) if owner is not None else (inf, 0, i)
    gate_anchor = _gate_anchors(model, set(gates), called, plans)
    for k, name in enumerate(gates):
        anchor = gate_anchor.get(name, ...)
        if anchor is ...:
            keys[name] = (inf, 2, k)
        else:
            keys[name] = (called[anchor] if anchor is not None else -1, 2, k)
    return sorted(keys, key=keys.__getitem__)


def _ancestors(name: str) -> list[str]:
    """'a.b.c' -> ['a.b', 'a'], nearest first."""
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1)]


def _gate_anchors(
    model: nn.Module, gates: set[str], called: Mapping[str, int], plans: tuple[tuple[str, Plan], ...] = ()
) -> dict[str, str | None]:
    """gate name -> the layer it comes right after (None: before every layer).

    In a GraphModule (``apply(..., graph_module=True)``), the last called layer before the gate's
    get_attr node. Elsewhere the gates live at ``<owner>.resify.<site>.<alpha|gamma|beta>`` beside
    the site's layers, in the owner's rewritten forward: a site's gates come right after the last of
    its end layer and its own added layers (a projection) to be called.
    """
    anchors: dict[str, str | None] = {}
    if not gates:
        return anchors
    anchors.update(_graph_anchors(model, gates, called))
    by_site: dict[str, list[str]] = {}  # "<owner>.resify.<site>" -> its gates
    for gate in gates:
        by_site.setdefault(gate.rsplit(".", 1)[0], []).append(gate)
    added: dict[str, list[str]] = {}  # "<owner>.resify.<site>" -> its layers that ran (a projection)
    for name in called:
        parts = name.split(".")
        if NAMESPACE in parts[:-1]:
            at = len(parts) - 1 - parts[::-1].index(NAMESPACE)
            added.setdefault(".".join(parts[: at + 2]), []).append(name)
    for prefix, plan in plans:
        for site in plan.sites:
            base = ".".join(p for p in (prefix, site.owner, NAMESPACE, site.name) if p)
            end = f"{prefix}.{site.end}" if prefix else site.end
            ran = [n for n in (end, *added.get(base, ())) if n in called]
            for gate in by_site.get(base, ()) if ran else ():
                anchors.setdefault(gate, max(ran, key=called.__getitem__))
    return anchors


def _graph_anchors(model: nn.Module, gates: set[str], called: Mapping[str, int]) -> dict[str, str | None]:
    """gate name -> the last called layer before its get_attr node, in the GraphModules ``model`` holds."""
    anchors: dict[str, str | None] = {}
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
    """Run the measurement seeded, then put back every gradient, buffer, mode and the random state
    (marked as measuring: a ``resify.watch`` on the model does not count this pass as a step)."""
    with state_kept(model, inputs, grads=True, modes=True) as devices, torch.enable_grad(), measuring():
        torch.default_generator.manual_seed(seed)
        for d in devices:
            torch.cuda.default_generators[d].manual_seed(seed)
        yield


def _batch_inputs(inputs: tuple[Any, ...], batches: int, seed: int) -> Iterator[tuple[Any, ...]]:
    """The example (detached, floating tensors requiring grad), then random batches of its shapes."""
    gen = torch.Generator().manual_seed(seed)
    prepare = as_leaf

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
        raise ResifyError(
            f"{type(model).__name__} failed on the example input ({shapes}): {type(e).__name__}: {first_line(e)}; "
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
