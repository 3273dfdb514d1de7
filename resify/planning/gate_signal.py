"""The forward that ``gate='auto'`` reads: the example run as the converted model would run it.

Part of stage 3 (planning), for ``gating``: ``measure_sites`` runs the traced graph once with every
site's shortcut joined as ``rewrite`` will join it (a learned projection drawn from a generator of its
own, the gates decided so far applied) and records, per site, the mean squares of its input, its
branch, its shortcut and their sum (``SiteSignal``); the model's buffers and the random state are put
back after each run. ``Unmeasured`` says why no forward could run (meta tensors, an example the graph
refuses).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.fx
import torch.nn.functional as F

from ..formats import first_line
from ..ops import data_input
from ..state import state_kept
from ..tracing.trace import Traced
from .sites import Dense, Projection, Site

__all__ = ["SiteSignal", "Unmeasured", "measure_sites"]


class SiteSignal(NamedTuple):
    """What the measured forward saw at one site, as the converted model computes it: the mean
    squares of the site's input x, of the branch F, of the shortcut S and of their ungated sum F + S
    (for a learned projection, E[F²] + E[S²]: its fresh weights are independent of the branch, so
    the product's mean is 0 but for the chance of one draw)."""

    entry: float
    branch: float
    shortcut: float
    joined: float

    @property
    def ratio(self) -> float:
        """E[F²] / E[S²]: how loud the branch is beside its shortcut."""
        return _over(self.branch, self.shortcut)

    @property
    def growth(self) -> float:
        """E[(F + S)²] / E[S²]: how much the site, ungated, grows the signal its shortcut carries."""
        return _over(self.joined, self.shortcut)

    @property
    def gain(self) -> float:
        """E[(F + S)²] / E[x²]: how much the site, ungated, grows the signal it receives."""
        return _over(self.joined, self.entry)


def _over(a: float, b: float) -> float:
    if not math.isfinite(a) or not math.isfinite(b):
        return math.inf
    if b <= 0:
        return math.inf if a > 0 else 1.0
    return a / b


def _mean(t: torch.Tensor) -> float:
    return t.detach().double().mean().item() if t.numel() else 0.0


class Unmeasured(Exception):
    """No forward could be run; the message says why."""


def _strided(x: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """What a 1×1 convolution of ``stride`` keeps: every s-th position."""
    if not stride or all(s == 1 for s in stride):
        return x
    index = (slice(None), slice(None), *(slice(None, None, s) for s in stride))
    return x[index]


def _pooled(x: torch.Tensor, form: Projection, like: torch.Tensor) -> torch.Tensor:
    """``x`` average-pooled (or upsampled, nearest) to ``like``'s spatial size, as the shortcut does."""
    size = tuple(like.shape[2:])
    if form.upsample:
        return F.interpolate(x, size=size, mode="nearest")
    pool: Callable[..., torch.Tensor] = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[
        len(size)
    ]
    return pool(x, size)


def _fresh(shape: tuple[int, ...], fan_in: int, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Weights as torch's default init draws a fresh layer's: U(±1/√fan_in) (kaiming_uniform, a=√5)."""
    u = torch.rand(shape, generator=generator, device=x.device, dtype=torch.float32)
    return ((2 * u - 1) / math.sqrt(fan_in)).to(x.dtype)


def _shortcut(site: Site, x: torch.Tensor, branch: torch.Tensor, training: bool, gen: torch.Generator) -> torch.Tensor:
    """S(x) as the converted model computes it at initialisation; a learned projection drawn as
    ``rewrite`` will draw it (from a generator of our own: the global random state is not touched)."""
    form = site.shortcut
    if not isinstance(form, Projection):
        return x
    cin, cout = form.channels
    if form.op == "linear":
        return F.linear(x, _fresh((cout, cin), cin, x, gen), _fresh((cout,), cin, x, gen))
    if form.pool and not form.pool_last:
        x = _pooled(x, form, branch)
    if form.op == "conv":
        fan_in = cin // form.groups
        weight = _fresh((cout, fan_in, *(1,) * form.dims), fan_in, x, gen)
        conv: Callable[..., torch.Tensor] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[form.dims]
        x = conv(x, weight, stride=form.stride or 1, groups=form.groups)
        if form.norm:  # a fresh BatchNorm: batch statistics in training, running ones (0, 1) in eval
            x = F.batch_norm(x, None, None, training=True) if training else x / math.sqrt(1 + 1e-5)
    else:  # "pool" or "pad" (ResNet's option A): no parameters
        x = _strided(x, form.stride)
        cd = site.channel_dim
        if cout > cin:
            x = F.pad(x, [0, 0] * ((x.dim() - 2) if cd == 1 else 0) + [0, cout - cin])
        elif cout < cin:
            x = x.narrow(cd, 0, cout)
    if form.pool and form.pool_last:
        x = _pooled(x, form, branch)
    return x


class _Forward(torch.fx.Interpreter):
    """Runs a traced graph with the plan's shortcuts in place, each branch scaled by ``alpha(site,
    signal)`` (1: ungated), recording every site's :class:`SiteSignal`."""

    def __init__(self, traced: Traced, sites: Sequence[Site], alpha: Callable[[Site, SiteSignal], float]) -> None:
        super().__init__(traced.root, graph=traced.graph)
        nodes = {n.name: n for n in traced.graph.nodes}
        self.at_exit: dict[str, list[Site]] = {}
        self.entry: dict[str, str] = {}
        for s in sites:
            x = data_input(nodes[s.anchor])
            if isinstance(s.shortcut, Dense) or not isinstance(x, torch.fx.Node):
                continue  # a dense site's widened consumer computes what it did: nothing changes
            self.at_exit.setdefault(s.exit, []).append(s)
            self.entry[s.name] = x.name
        self.wanted = set(self.entry.values())
        self.kept: dict[str, torch.Tensor] = {}
        self.alpha = alpha
        self.training = traced.training
        self.signals: dict[str, SiteSignal] = {}
        self.generator: torch.Generator | None = None  # for the projections' weights, made on first use

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        for site in self.at_exit.get(n.name, ()):
            x = self.kept.get(self.entry[site.name])
            if not isinstance(x, torch.Tensor) or not isinstance(value, torch.Tensor) or not value.is_floating_point():
                continue
            if self.generator is None or self.generator.device != x.device:
                self.generator = torch.Generator(x.device).manual_seed(0)
            s = _shortcut(site, x, value, self.training, self.generator)
            joined = value + s
            f2, s2 = _mean(value.pow(2)), _mean(s.pow(2))
            learned = isinstance(site.shortcut, Projection) and site.shortcut.learned
            signal = SiteSignal(_mean(x.pow(2)), f2, s2, f2 + s2 if learned else _mean(joined.pow(2)))
            a = self.alpha(site, signal)
            value = joined if a == 1.0 else value * a + s
            self.signals[site.name] = signal
        if n.name in self.wanted and isinstance(value, torch.Tensor):
            self.kept[n.name] = value
        return value


def _placeholder_values(traced: Traced) -> list[Any]:
    """The value of each of the graph's inputs: the example's, by position then by name, else the default."""
    inputs, named = list(traced.example_inputs), dict(traced.example_kwargs)
    values = []
    for i, n in enumerate(n for n in traced.graph.nodes if n.op == "placeholder"):
        name = str(n.target).lstrip("*")
        if i < len(inputs):
            values.append(inputs[i])
        elif name in named:
            values.append(named[name])
        else:
            values.append(n.args[0] if n.args else None)
    return values


def measure_sites(
    traced: Traced, sites: Sequence[Site], alpha: Callable[[Site, SiteSignal], float]
) -> dict[str, SiteSignal]:
    """Run ``traced``'s graph on its example inputs with ``sites``' shortcuts in place, each branch
    scaled by ``alpha(site, signal)`` as it is reached (1: ungated), in forward order; every site's
    signal by name. The model's buffers and the random state are restored.

    Raises:
        Unmeasured: the graph cannot run on real values (meta tensors) or failed on the example.
    """
    run = _Forward(traced, sites, alpha)
    _run(traced, run)
    return run.signals


def _run(traced: Traced, run: torch.fx.Interpreter) -> float:
    """Run ``run`` on the example (the model's buffers and the random state restored); the mean square
    of its output (of every floating-point tensor in it, pooled: a tuple of logits and auxiliary logits)."""
    tensors = [*traced.root.parameters(), *traced.root.buffers(), *traced.example_inputs]
    if any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
        raise Unmeasured("the model is on the meta device")
    try:
        with state_kept(traced.root), torch.no_grad():
            torch.manual_seed(0)  # dropout draws alike on every call: the same plan for the same model
            out = run.run(*_placeholder_values(traced))
    except Exception as e:  # the measurement is advice: any failure falls back on the branches alone
        raise Unmeasured(f"the example's forward failed: {first_line(e)}") from e
    return _square(out)


def _square(out: Any) -> float:
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    n = sum(t.numel() for t in leaves)
    return sum(t.detach().double().pow(2).sum().item() for t in leaves) / n if n else 0.0
