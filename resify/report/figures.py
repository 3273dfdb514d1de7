"""The figures themselves: norms and mean |grad| of tensors, and the sink that collects them.

A leaf of the report: ``probe`` calls these from its hooks, ``measure`` and ``resify.watch`` turn
a sink into per-layer figures with ``combine``. One tensor's figures (``figures_of``) and many
small ones' at once (``stacked_figures``) are the same arithmetic, so a watched step and
``gradient_flow`` agree.
"""

from __future__ import annotations

import math
from array import array
from typing import Any

import torch

__all__ = [
    "Sink",
    "combine",
    "l2_norm",
    "activation_figures",
    "figures_of",
    "stacked_figures",
    "BATCH_NUMEL",
]

#: tensors of at most this many elements are measured stacked with the others of their size (one
#: reduction for many small layers, where each call costs more than its arithmetic); larger ones one
#: at a time, where stacking would only copy them. ``probe.Probe`` with ``keep_grads`` also holds
#: such small gradients until the end of the backward (``Probe.finish``); larger ones at once.
BATCH_NUMEL = 1 << 12


class Sink:
    """Measured scalars under keys; read back to the host all at once (one copy per device).

    On the CPU a figure is a float at once (no sync to avoid, and fewer tensors to stack); on an
    accelerator it stays a 0-dim tensor until ``pack`` stacks them (no host sync) and ``resolve``
    copies them back. A packed sink is compact: its keys in one tuple, its floats in an array
    (a watch keeps one per recorded step, and the garbage collector has little to walk).
    """

    def __init__(self) -> None:
        self.keys: tuple[tuple, ...] = ()
        self._keys: list[tuple] = []
        self._items: list[torch.Tensor | float] = []
        self._values = array("d")
        self._packed: list[tuple[list[int], torch.Tensor]] = []

    def add(self, key: tuple, value: torch.Tensor | float) -> None:
        if isinstance(value, torch.Tensor) and value.device.type == "cpu":
            value = value.item()
        if not isinstance(value, torch.Tensor):
            value = float(value)  # an int (a count, an integer tensor's item) is a figure too
        self._keys.append(key)
        self._items.append(value)

    def extend(self, keys: list[tuple], values: list[Any]) -> None:
        """Many figures at once: floats, or 0-dim tensors on an accelerator (no CPU tensor)."""
        self._keys += keys
        self._items += values

    def pack(self, keys_like: tuple[tuple, ...] = ()) -> None:
        """Stack the figures still on a device into one float64 tensor per device (no host sync), and
        keep the keys as one tuple (``keys_like`` itself where equal: the steps of a watch share it)."""
        offset = len(self.keys)
        by_device: dict[torch.device, list[int]] = {}
        for i, v in enumerate(self._items):
            if isinstance(v, torch.Tensor):
                by_device.setdefault(v.device, []).append(i)
        for idx in by_device.values():
            stacked = torch.stack([self._items[i].double() for i in idx])  # type: ignore[union-attr]
            self._packed.append(([offset + i for i in idx], stacked))
        keys = self.keys + tuple(self._keys)
        self.keys = keys_like if keys == keys_like else keys
        self._values.extend(v if isinstance(v, float) else math.nan for v in self._items)
        self._keys, self._items = [], []

    def resolve(self) -> list[tuple[tuple, float]]:
        self.pack()
        floats = self._values.tolist()
        for idx, stacked in self._packed:
            for i, v in zip(idx, stacked.tolist()):
                floats[i] = v
        return list(zip(self.keys, floats))


def combine(items: list[tuple[tuple, float]], batches: int) -> dict:
    """name -> {figure: mean over batches}, and "loss" -> the mean loss.

    Keys of ``items``: ("loss",); ("weight", name) the weight's norm; ("mean_abs" | "grad_norm",
    name, batch); ("input", name, batch) the norm of the gradient at one input tensor (a layer
    called several times has several: root of the summed squares); ("act", name, batch, numel)
    the norm of one output (RMS over all the layer's outputs); ("sim", name, batch) how alike one
    output's examples are (``activation_figures``; mean over the layer's outputs; NaN: not measured).
    """
    out: dict = {}
    losses: list[float] = []
    means: dict[tuple[str, str], list[float]] = {}  # (name, "mean_abs" | "grad_norm") -> [sum, count]
    inputs: dict[tuple[str, int], float] = {}  # (name, batch) -> sum of squared norms
    act: dict[tuple[str, int], list[float]] = {}  # (name, batch) -> [sum of squared norms, elements]
    sim: dict[tuple[str, int], list[float]] = {}  # (name, batch) -> [sum, count]
    for key, v in items:
        kind = key[0]
        if kind == "mean_abs" or kind == "grad_norm":
            acc = means.get((key[1], kind))
            if acc is None:
                means[(key[1], kind)] = [v, 1.0]
            else:
                acc[0] += v
                acc[1] += 1.0
        elif kind == "act":
            acc = act.get((key[1], key[2]))
            if acc is None:
                act[(key[1], key[2])] = [v * v, key[3]]
            else:
                acc[0] += v * v
                acc[1] += key[3]
        elif kind == "input":
            inputs[(key[1], key[2])] = inputs.get((key[1], key[2]), 0.0) + v * v
        elif kind == "sim":
            if math.isfinite(v):
                acc = sim.setdefault((key[1], key[2]), [0.0, 0.0])
                acc[0] += v
                acc[1] += 1.0
        elif kind == "weight":
            out.setdefault(key[1], {})["weight"] = v
        elif kind == "loss":
            losses.append(v)
    for (name, kind), (total, count) in means.items():
        out.setdefault(name, {})[kind] = total / count
    # per batch, then the mean over batches: input gradients over all of them (a batch where none
    # arrived counts as zero), the others over those that measured the layer
    per_batch: dict[tuple[str, str], list[float]] = {}
    for (name, _), ss in inputs.items():
        per_batch.setdefault((name, "input"), []).append(math.sqrt(ss))
    for (name, _), (ss, count) in act.items():
        per_batch.setdefault((name, "rms"), []).append(math.sqrt(ss / count))
    for (name, _), (total, count) in sim.items():
        per_batch.setdefault((name, "similarity"), []).append(total / count)
    for (name, kind), vs in per_batch.items():
        out.setdefault(name, {})[kind] = sum(vs) / (batches if kind == "input" else len(vs))
    if losses:  # (a watched training step: the loss is the user's, not seen)
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
    if type(t) is torch.Tensor and t.numel() > BATCH_NUMEL and t.dtype == torch.float32 and t.is_contiguous():
        # a BLAS dot product: ~25% faster than vector_norm on the CPU, and as exact (subclasses such as
        # DTensor, whose norm is a reduction over ranks, keep vector_norm; small tensors keep it too,
        # to the bit what ``stacked_figures`` gives them)
        flat = t.view(-1)
        v = math.sqrt(torch.dot(flat, flat).item())
    else:  # (half precision in float32: a float16 norm of a million 0.1s comes out 99.3, not 100.0)
        v = torch.linalg.vector_norm(t, dtype=_widened(t)).item()
    if t.dtype != torch.float64 and (math.isinf(v) or (v == 0 and nonzero)):
        v = torch.linalg.vector_norm(t, dtype=torch.float64).item()
    if math.isinf(v):  # past float64's sum of squares (a float64 tensor beyond ~1e154): scaled by its largest
        largest = t.detach().abs().max().double()
        if math.isfinite(largest.item()):
            v = (largest * torch.linalg.vector_norm(t.double() / largest)).item()
    return v


def activation_figures(
    t: torch.Tensor, sequence: bool = False
) -> tuple[torch.Tensor | float, torch.Tensor | float | None]:
    """(‖t‖, how alike t's examples are) of one layer output ``t``.

    The similarity is the correlation of mean-field signal propagation (Poole et al. 2016,
    "Exponential expressivity in deep neural networks through transient chaos"; Schoenholz et al.
    2017, "Deep information propagation"), whose fixed point 1 is the collapse of every input onto
    one output, taken over the batch: the mean inner product of two different examples' outputs ÷
    the mean squared norm of one, Σ_{i≠j} x_i·x_j / ((N−1) Σ_i ‖x_i‖²), x_i being the slice ``t[i]``
    flattened. It is 1 − N/(N−1)·(std/RMS)², std being the output's standard deviation across the
    batch and RMS its root mean square; where the examples' norms are equal it is their mean
    pairwise cosine similarity (the rank-collapse measure of Noci et al. 2022, "Signal propagation
    in transformers"). One pass, no N×N matrix: Σ_{i≠j} x_i·x_j = ‖Σ_i x_i‖² − Σ_i ‖x_i‖².

    For a ``sequence`` (a 3-D output of a layer that is not a convolution, [batch, positions,
    features] or [positions, batch, features]) the slices along the second dimension are compared
    too and the larger similarity kept: a sequence whose positions become one vector is the rank
    collapse of a Transformer without its residuals (Dong et al. 2021, "Attention is not all you
    need: pure attention loses rank doubly exponentially with depth"), whichever dimension holds
    the batch. Near 1, the layer maps every example (or position) to nearly one vector. None where
    there are fewer than two slices, a slice is one number, or the output is 0. Sums and norms are
    taken in float32 (a float64 norm of a large activation costs ~8× more on the CPU), which resolves
    1 − similarity to a few 1e-6: finer than ``COLLAPSE_SIMILARITY`` needs by far.

    On the CPU both are floats (the norm as ``l2_norm`` takes it); on accelerators 0-dim float64
    tensors (no host sync; the similarity NaN where it is not measured).
    """
    shape = t.shape
    n = shape[0] if len(shape) >= 2 else 0
    if n < 2 or t.numel() < 2 * n:
        return l2_norm(t), None
    x = t.float() if t.dtype in _HALF else t  # (a half-precision sum cannot tell 1 - 1e-4 from 1)
    norm = l2_norm(x)
    sim = _alike(x, 0, norm)
    if sequence and len(shape) == 3 and shape[1] >= 2:
        other = _alike(x, 1, norm)
        if isinstance(sim, torch.Tensor):
            sim = torch.fmax(sim, other)  # type: ignore[arg-type]  # (fmax: NaN, not measured, gives way)
        elif other is not None and (sim is None or other > sim):
            sim = other
    return norm, sim


#: activations measured in float32 (their sums and norms)
_HALF = (torch.float16, torch.bfloat16)


def _alike(x: torch.Tensor, dim: int, norm: torch.Tensor | float) -> torch.Tensor | float | None:
    """The similarity of ``activation_figures`` between the slices of ``x`` along ``dim`` (``norm``: ‖x‖)."""
    count = x.shape[dim]
    total = x.sum(dim)
    if isinstance(norm, torch.Tensor):  # an accelerator: float64, no sync (0 / 0 is NaN: not measured)
        ss = norm.square()
        q = torch.linalg.vector_norm(total, dtype=torch.float64).square()
        return ((q - ss) / ((count - 1) * ss)).clamp(max=1.0)
    sq = norm * norm
    if not (math.isfinite(sq) and sq > 0):
        return None
    q = l2_norm(total, nonzero=False)
    if math.isinf(q) or q == 0:  # past float32's sum of squares, or below it: again in float64
        q = torch.linalg.vector_norm(x.double().sum(dim)).item()
    return min((q * q - sq) / ((count - 1) * sq), 1.0)  # (rounding can pass 1)


def figures_of(t: torch.Tensor, grads: bool, *, in_place: bool = False) -> tuple[Any, torch.Tensor | float]:
    """(mean |t| or None, ‖t‖) of one tensor: mean |grad| is the seed's print_gradients expression.

    ``in_place``: ``t`` may be overwritten (by |t|: a tensor about to be dropped, no copy made). A
    sparse tensor (an ``nn.Embedding(sparse=True)``'s gradient) is measured by its stored values,
    as the dense tensor it stands for: its mean over every element, the zeros too."""
    if t.layout != torch.strided:
        in_place = in_place or not t.is_coalesced()  # (where coalesce makes new values, they are ours)
        t, mean_of = t.coalesce().values(), t.numel()
    else:
        mean_of = 0
    if not grads:
        return None, l2_norm(t)
    a = t.abs_() if in_place else t.abs()
    # the sum ÷ the count: mean() would add a division kernel (a third of the weight gradient's figures
    # on the CPU), and the count divides in float64; a half-precision sum is taken in float32 (a float16
    # one passes 65,504 at a mean of 0.1 over a million elements)
    count = mean_of or t.numel()
    total = a.sum(dtype=_widened(a))
    mean_abs: torch.Tensor | float = (total.item() if t.device.type == "cpu" else total) / count if count else math.nan
    return mean_abs, l2_norm(a, nonzero=not isinstance(mean_abs, float) or mean_abs != 0)


def stacked_figures(tensors: list[torch.Tensor], grads: bool) -> list[tuple[Any, Any]]:
    """``figures_of`` of several tensors of one shape, device and dtype, in one reduction each."""
    stacked = torch.stack(tensors).reshape(len(tensors), -1)
    means: list[Any] = [None] * len(tensors)
    if stacked.device.type != "cpu":  # as l2_norm: float64 inside the reduction, no host sync
        norms: list[Any] = list(torch.linalg.vector_norm(stacked, dim=1, dtype=torch.float64))
        if grads:
            means = list(stacked.abs().sum(dim=1, dtype=_widened(stacked)) / stacked.shape[1])
        return list(zip(means, norms))
    norms = torch.linalg.vector_norm(stacked, dim=1, dtype=_widened(stacked)).tolist()
    if grads:
        means = [v / stacked.shape[1] for v in stacked.abs().sum(dim=1, dtype=_widened(stacked)).tolist()]
    # as l2_norm: again in float64 where the norm overflowed, or underflowed to 0 (a true 0 has mean 0)
    again = [i for i, (v, m) in enumerate(zip(norms, means)) if math.isinf(v) or (v == 0 and m != 0)]
    if again:
        redone = torch.linalg.vector_norm(stacked[again], dim=1, dtype=torch.float64).tolist()
        for i, v in zip(again, redone):
            norms[i] = v
    return list(zip(means, norms))


def _widened(t: torch.Tensor) -> torch.dtype | None:
    """The dtype a gradient's sum or norm is taken in: float32 for half precision, else its own (None)."""
    return torch.float32 if t.dtype in _HALF else None
