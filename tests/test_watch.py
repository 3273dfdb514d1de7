"""resify.watch: the figures of gradient_flow at every N-th backward of a training loop, and no trace.

Every recorded step is checked against ``resify.gradient_flow`` on the same model, batch and loss
(relative tolerance ``REL``: the two share the probe, and a watch measures small gradients stacked,
which on one CPU thread gives the same bits); gates against the parameters; hooks counted on
modules, parameters and tensors; AMP (bfloat16 autocast + GradScaler), DDP over gloo (2
processes) and torch.compile.
"""

import copy
import json
import math
import re
import warnings

import pytest
import styles
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from test_interop import _finish, _init

import resify
from resify.errors import ResifyError, ResifyWarning

#: relative tolerance between a watched step and gradient_flow (the same arithmetic; stacking
#: small tensors may reorder a sum where torch uses more than one thread)
REL = 1e-6
FIGURES = ("mean_abs_grad", "grad_norm", "grad_to_weight", "input_grad_norm", "activation_rms", "activation_similarity")


pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def _assert_same_flow(watched, reference, where=""):
    """Two GradientFlow reports: the same layers in the same order, figures within REL, same verdicts."""
    assert [r.name for r in watched.layers] == [r.name for r in reference.layers], where
    for a, b in zip(watched.layers, reference.layers):
        for f in FIGURES:
            va, vb = getattr(a, f), getattr(b, f)
            if vb is None:
                assert va is None, (where, a.name, f)
            else:
                assert va == pytest.approx(vb, rel=REL, abs=0), (where, a.name, f)
        assert a.verdict == b.verdict, (where, a.name)
    assert (watched.verdict, watched.reason) == (reference.verdict, reference.reason), where


def _hooks(model):
    """Every hook on the model's modules and parameters (forward, backward, with kwargs, post-accumulate)."""
    n = 0
    for m in model.modules():
        for d in (
            m._forward_hooks,
            m._forward_pre_hooks,
            m._backward_hooks,
            m._backward_pre_hooks,
            m._forward_hooks_with_kwargs,
            m._forward_pre_hooks_with_kwargs,
        ):
            n += len(d)
    for p in model.parameters():
        n += len(p._backward_hooks or {}) + len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    return n


class TwoHeads(nn.Module):
    """One input tensor taken by two layers, a layer called twice, a dict output."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.a(x)) + torch.tanh(self.b(x))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        return {"logits": self.head(h), "features": h}


def inplace_cnn():
    """ReLU(inplace=True) after every conv: the activation figure must be read before it is overwritten."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _rezero_mlp(gate="rezero", gate_init=0.1, depth=6):
    torch.manual_seed(0)
    return resify.apply(styles.deep_mlp(depth=depth), torch.randn(2, 8), gate=gate, gate_init=gate_init)


# (model builder, input shape, loss of the output given y)
CASES = {
    "rezero_mlp": (_rezero_mlp, (16, 8), lambda out, y: F.cross_entropy(out, y)),
    "layerscale_mlp": (lambda: _rezero_mlp("layerscale", 0.5), (16, 8), lambda out, y: F.cross_entropy(out, y)),
    "small_cnn_bn": (styles.small_cnn, (4, 3, 8, 8), lambda out, y: F.cross_entropy(out, y)),
    "inplace_cnn": (inplace_cnn, (4, 3, 8, 8), lambda out, y: F.cross_entropy(out, y)),
    "checkpointed": (lambda: styles.CheckpointedMLP(False), (16, 8), lambda out, y: F.cross_entropy(out, y)),
    "checkpointed_reentrant": (lambda: styles.CheckpointedMLP(True), (16, 8), lambda out, y: F.cross_entropy(out, y)),
    "two_heads": (
        TwoHeads,
        (16, 8),
        lambda out, y: F.cross_entropy(out["logits"], y) + out["features"].square().mean(),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # (reentrant checkpointing's, for x)
def test_recorded_figures_equal_gradient_flow_on_the_same_batch_and_loss(case):
    build, shape, loss_of = CASES[case]
    torch.manual_seed(1)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(2)
    references = {}
    with resify.watch(model, every=2) as w:
        for step in range(5):
            x, y = torch.randn(shape, generator=g), torch.randint(0, 3, (shape[0],), generator=g)
            if step % 2 == 0:  # the same weights, batch and loss; gradient_flow leaves no trace and is not counted
                references[step] = resify.gradient_flow(model, x, loss_fn=lambda out, y=y: loss_of(out, y))
            opt.zero_grad()
            loss_of(model(x), y).backward()
            opt.step()
    assert w.steps_seen == 5 and w.history.steps == (0, 2, 4)
    for record in w.history.records:
        _assert_same_flow(record.flow, references[record.step], where=f"{case} step {record.step}")
    assert references[4].layers[0].mean_abs_grad != references[0].layers[0].mean_abs_grad  # it trained


def test_under_gradient_accumulation_each_backward_is_its_own_record():
    """The figure is the gradient of that backward, not the .grad it is added to."""
    model = _rezero_mlp()
    xs = [torch.randn(8, 8, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    refs = [resify.gradient_flow(model, x, loss_fn=lambda out: out.square().mean()) for x in xs]
    with resify.watch(model, every=1) as w:
        for x in xs:  # two micro-batches into one .grad, no optimizer step between
            model(x).square().mean().backward()
    assert len(w.history.records) == len(refs) == 2  # one record per backward, none dropped
    for record, ref in zip(w.history.records, refs, strict=True):
        _assert_same_flow(record.flow, ref, where=f"micro-batch {record.step}")


def test_steps_count_backward_passes_only():
    model = _rezero_mlp()
    x = torch.randn(4, 8)
    with resify.watch(model, every=3) as w:
        for _ in range(7):
            model(x).sum().backward()
            with torch.no_grad():
                model(x)  # evaluation: not a step
            resify.gradient_flow(model, x)  # a report in between: not a step either
    assert w.steps_seen == 7 and w.history.steps == (0, 3, 6)
    with resify.watch(TwoHeads(), every=1) as w2:
        out = w2.model(x)
        (out["logits"].sum() + out["features"].sum()).backward()  # one backward through two outputs
    assert w2.steps_seen == 1 and len(w2.history.records) == 1


def test_close_removes_every_hook_and_training_is_unchanged():
    model = _rezero_mlp()
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    before = _hooks(model)
    w = resify.watch(model, every=2)
    assert _hooks(model) == before + 2  # between records: a pre-hook and a hook on the model itself
    out = model(x)  # a recorded step's forward: the probe's hooks are on
    assert _hooks(model) > before + 2 + len(list(model.parameters()))
    assert out._backward_hooks is not None and len(out._backward_hooks) == 1  # the step counter on the output
    with pytest.warns(ResifyWarning, match="saw no backward pass"):
        w.close()  # in the middle of the step: everything comes off
    assert _hooks(model) == before
    out.sum().backward()  # the output's counter is inert now
    assert w.steps_seen == 0 and not w.history.records
    assert model(x)._backward_hooks is None
    # watched training computes what unwatched training computes, to the bit
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model, twin)]
    with resify.watch(model, every=2):
        for _ in range(5):
            for m, opt in zip((model, twin), optimizers):
                opt.zero_grad()
                F.cross_entropy(m(x), y).backward()
                opt.step()
    assert _hooks(model) == before
    assert all(p._backward_hooks is None for p in model.parameters())  # not even an empty dict autograd would call
    resify.gradient_flow(model, x)  # the report's own hooks (post-accumulate) leave none either
    assert all(getattr(p, "_post_accumulate_grad_hooks", None) is None for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(p.grad, q.grad), name


def test_close_warns_when_no_backward_was_seen():
    model = _rezero_mlp()
    with pytest.warns(ResifyWarning, match="saw no backward pass"), resify.watch(model):
        pass


def test_gate_values_recorded_equal_the_parameters():
    for gate, init in (("rezero", 0.1), ("layerscale", 0.5)):
        model = _rezero_mlp(gate, init)
        gates = {n: p for n, p in model.named_parameters() if n.endswith(("alpha", "gamma"))}
        assert len(gates) == 5
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        snapshots = {}
        with resify.watch(model, every=2) as w:
            for step in range(5):
                model(torch.randn(8, 8)).square().mean().backward()
                if step % 2 == 0:
                    snapshots[step] = {n: tuple(p.detach().tolist()) for n, p in gates.items()}
                opt.step()
                opt.zero_grad()
        for record in w.history.records:
            assert dict(record.gates) == snapshots[record.step], (gate, record.step)
            assert [r.name for r in record.flow.layers if r.kind == "Gate"] == list(gates)
        assert w.history.records[-1].gates != w.history.records[0].gates  # the gates moved
        table = w.history.to_dict()
        rows = [i for i, n in enumerate(table["layer"]) if n in gates]
        assert all(table["gate_value"][i] is not None for i in rows)


def test_amp_bfloat16_with_a_grad_scaler_records_unscaled_figures():
    pytest.importorskip("torch.amp", reason="needs torch.amp")
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler needs torch >= 2.3")
    model = _rezero_mlp()
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    loss_fn = lambda out: F.cross_entropy(out.float(), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = resify.gradient_flow(model, x, loss_fn=loss_fn)  # unscaled, under the same autocast
    results = {}
    for labelled in (True, False):
        m = copy.deepcopy(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        with resify.watch(m, every=1, scaler=scaler if labelled else None) as w:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(m(x))
            scaler.scale(loss).backward()
        results[labelled] = w.history.records[0]
    unscaled, raw = results[True], results[False]
    assert (unscaled.scale, unscaled.overflow) == (2.0**10, False) and raw.scale == 1.0
    _assert_same_flow(unscaled.flow, reference, "autocast + GradScaler")
    for a, b in zip(raw.flow.layers, reference.layers):  # without scaler=: the scaled gradients, as labelled
        if b.input_grad_norm is not None:
            assert a.input_grad_norm == pytest.approx(b.input_grad_norm * 2**10, rel=REL)
        if b.mean_abs_grad is not None:
            assert a.mean_abs_grad == pytest.approx(b.mean_abs_grad * 2**10, rel=REL)
        assert a.activation_rms == b.activation_rms


def test_a_grad_scaler_overflow_is_marked_and_left_out_of_the_verdicts():
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler needs torch >= 2.3")
    model = _rezero_mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**126, backoff_factor=2.0**-40)
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)  # (the gradients are large: keep the weights)
    with resify.watch(model, every=1, scaler=scaler) as w:
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = 1e4 * model(torch.randn(8, 8)).float().square().mean()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    flags = [r.overflow for r in w.history.records]
    assert flags[0] and not flags[-1]  # the scaler overflowed, backed off, and found a finite scale
    assert scaler.get_scale() < 2.0**126
    timeline = w.verdicts
    assert timeline.skipped == tuple(r.step for r in w.history.records if r.overflow)
    assert set(timeline.steps).isdisjoint(timeline.skipped) and timeline.verdicts
    assert "exploding" not in timeline.verdicts  # an overflow of the scaled loss is not the model's gradient


def test_verdicts_give_the_step_of_each_change_and_the_layers():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(6)])
    x = torch.randn(32, 16)
    with resify.watch(model, every=2, label="tanh") as w:
        for step in range(8):
            if step == 4:  # a collapse: layer 3 scaled down, so the gradient below it shrinks 1e4-fold
                with torch.no_grad():
                    model[3][0].weight.mul_(1e-4)
            model(x).square().mean().backward()
            model.zero_grad()
    timeline = w.verdicts
    assert timeline.steps == (0, 2, 4, 6) and timeline.verdicts == ("healthy", "healthy", "vanishing", "vanishing")
    first, change = timeline.changes
    assert (first.step, first.verdict, first.before, first.positions) == (0, "healthy", None, ())
    assert (change.step, change.verdict, change.before) == (4, "vanishing", "healthy")
    flow = w.history.records[2].flow
    assert change.positions == tuple(i for i, r in enumerate(flow.layers) if r.verdict == "vanishing")
    assert change.positions == (0, 1, 2, 3) and change.layers == ("0.0", "1.0", "2.0", "3.0")
    assert timeline.at(5) == "vanishing" and timeline.at(3) == "healthy" and timeline.last == "vanishing"
    text = str(timeline)
    assert text.splitlines()[1].startswith("from step 4: vanishing in 4 layers, 0–3 ('0.0' … '3.0'); input gradient")
    assert w.history.summary().startswith("tanh (Sequential): 4 record(s) every 2 backward(s), steps 0–6")
    # each change says what to try, as the step's report does (nothing while healthy)
    assert (first.recommendation, change.recommendation) == (None, flow.recommendation)
    assert flow.recommendation and flow.recommendation.startswith("try shortcut='auto'")
    assert text.splitlines()[1].endswith(f"; {flow.reason}; {flow.recommendation}")
    assert w.history.summary().splitlines()[2] == text.splitlines()[1]


def test_history_is_a_dict_of_lists_and_json():
    model = _rezero_mlp()
    with resify.watch(model, every=1) as w:
        for _ in range(3):
            model(torch.randn(4, 8)).sum().backward()
    h = w.history
    table = h.to_dict()
    per_step = len(h.records[0].flow.layers)
    assert {len(v) for v in table.values()} == {3 * per_step}
    assert table["step"] == [s for s in (0, 1, 2) for _ in range(per_step)]
    assert table["input_grad_norm"][:per_step] == [r.input_grad_norm for r in h.records[0].flow.layers]
    assert h.series("0", "grad_norm") == [r.flow.layer("0").grad_norm for r in h.records]
    doc = json.loads(h.to_json())
    assert (doc["kind"], doc["every"], doc["steps"]) == ("resify.watch", 1, [0, 1, 2])
    assert doc["gates"]["resify.2.alpha"] == [list(r.gates["resify.2.alpha"]) for r in h.records]
    with pytest.raises(ResifyError, match="expected a figure among"):
        h.series("0", "loss")


def test_plot_draws_the_heatmap_beside_another(tmp_path):
    pytest.importorskip("matplotlib")
    plain = styles.deep_mlp(depth=6)
    converted = _rezero_mlp()
    watches = []
    for model in (plain, converted):
        with resify.watch(model, every=1) as w:
            for _ in range(3):
                model(torch.randn(4, 8)).sum().backward()
        watches.append(w)
    png = watches[0].plot(tmp_path / "flow.png", beside=[watches[1]])
    assert png.read_bytes()[:4] == b"\x89PNG"
    svg = watches[1].plot(tmp_path / "flow.svg")
    assert "resify.2.alpha" in svg.read_text() or "gate" in svg.read_text()
    with pytest.raises(ResifyError, match=r"\.png or \.svg"):
        watches[0].plot(tmp_path / "flow.jpg")
    with pytest.warns(ResifyWarning), resify.watch(styles.deep_mlp()) as empty:
        pass
    with pytest.raises(ResifyError, match="at least one recorded step"):
        empty.plot(tmp_path / "empty.png")


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((styles.deep_mlp(), 0), {}, "every must be a positive integer"),
        ((styles.deep_mlp(), True), {}, "every must be a positive integer"),
        ((nn.Sequential(nn.ReLU()),), {}, "no parametric layer"),
        (("model",), {}, "takes an nn.Module"),
    ],
)
def test_bad_arguments_are_refused(args, kwargs, match):
    with pytest.raises(ResifyError, match=match):
        resify.watch(*args, **kwargs)


def test_a_compiled_module_is_refused_and_one_compiled_before_the_watch_is_reported():
    model = styles.deep_mlp()
    x = torch.randn(4, 8)
    with pytest.raises(ResifyError, match="compiled with torch.compile.*watch the uncompiled module"):
        resify.watch(torch.compile(model, backend="aot_eager"))
    outer = nn.Sequential(torch.compile(styles.deep_mlp(), backend="aot_eager"), nn.Linear(3, 3))
    with pytest.raises(ResifyError, match="its submodule '0' is compiled"):
        resify.watch(outer)
    torch._dynamo.reset()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # dynamo's notes on graph breaks
            compiled = torch.compile(model, backend="aot_eager")
            compiled(x).sum().backward()  # compiled before the watch: its code has no hooks
            w = resify.watch(model)
            for _ in range(2):
                compiled(x).sum().backward()
        with pytest.warns(ResifyWarning, match="saw no backward pass.*torch.compile"):
            w.close()
        assert w.steps_seen == 0 and not w.history.records
        # watched first, then compiled (torch 2.14): dynamo runs the hooks, breaking its graph around them
        torch._dynamo.reset()
        model.zero_grad()
        reference = resify.gradient_flow(model, x, loss_fn=lambda out: out.sum())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            with resify.watch(model, every=2) as w:
                compiled = torch.compile(model, backend="aot_eager")
                for _ in range(3):
                    compiled(x).sum().backward()
                    model.zero_grad()
        assert w.history.steps == (0, 2)
        for record in w.history.records:
            _assert_same_flow(record.flow, reference, f"compiled after watching, step {record.step}")
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# DDP over gloo, 2 processes: each rank records its own backward (its own batch, before the all-reduce)


def _ddp_watch_worker(rank, world, path, out):
    _init(rank, world, path)
    try:
        model = _rezero_mlp()  # the same weights on both ranks; different data per rank
        before = _hooks(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1 + rank)
        references = []
        with resify.watch(ddp, every=2) as w:
            for step in range(4):
                x, y = torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
                if step % 2 == 0:
                    local = copy.deepcopy(model)  # this rank's weights, outside DDP
                    references.append(resify.gradient_flow(local, x, target=y).to_json())
                opt.zero_grad()
                F.cross_entropy(ddp(x), y).backward()
                opt.step()
        result = {
            "steps": w.history.steps,
            "records": [r.flow.to_json() for r in w.history.records],
            "references": references,
            "hooks": (before, _hooks(model)),
            "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        }
        torch.save(result, f"{out}.{rank}")
    except BaseException:
        dist.destroy_process_group()
        raise
    _finish()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_ddp_over_gloo_each_rank_records_its_own_batch(tmp_path):
    out = str(tmp_path / "state")
    mp.spawn(_ddp_watch_worker, args=(2, str(tmp_path / "rendezvous"), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for rank, r in enumerate(ranks):
        assert r["steps"] == (0, 2)
        assert r["hooks"][0] == r["hooks"][1], "hooks left on the model"
        for watched, reference in zip(r["records"], r["references"]):
            _assert_same_flow(
                resify.GradientFlow.from_json(watched), resify.GradientFlow.from_json(reference), f"rank {rank}"
            )
    a, b = (json.loads(r["records"][1]) for r in ranks)
    assert a["layers"][0]["input_grad_norm"] != b["layers"][0]["input_grad_norm"]  # each rank its own batch
    for k in ranks[0]["params"]:  # and DDP still keeps the ranks equal
        torch.testing.assert_close(ranks[0]["params"][k], ranks[1]["params"][k], rtol=0, atol=0, msg=k)


def test_the_recorded_flow_is_judged_by_the_report_rules():
    """A plain deep sigmoid MLP: the watch's verdict and recommendation are gradient_flow's (vanishing)."""
    torch.manual_seed(0)
    layers = []
    for _ in range(30):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    model = nn.Sequential(*layers)
    x = torch.randn(8, 16)
    reference = resify.gradient_flow(model, x, loss_fn=lambda out: out.square().mean())
    with resify.watch(model, every=1) as w:
        model(x).square().mean().backward()
    flow = w.history.records[0].flow
    assert flow.verdict == "vanishing" and "shortcut='auto'" in (flow.recommendation or "")
    assert (flow.reason, flow.recommendation, flow.first_to_last) == (
        reference.reason,
        reference.recommendation,
        reference.first_to_last,
    )
    assert flow.loss == "training loss (not seen)" and math.isnan(flow.loss_value)


# ---------------------------------------------------------------------------------------------
# a step that blows up: judged against the first recorded step


def _relu_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))


def test_a_step_whose_loss_blows_up_is_exploding():
    """Step 1's loss (the targets moved: the issue's 22,948 after a first step near 1) is 1e6× step 0's."""
    model = _relu_mlp()
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    losses = []
    with resify.watch(model, every=1) as w:
        for step, target in enumerate((y, 1000 * y, y)):
            loss = F.mse_loss(model(x), target)
            losses.append(loss.item())
            if step < 2:
                w.record_loss(loss)  # before the backward (step 0) ...
            loss.backward()
            if step == 2:
                w.record_loss(float("nan"))  # ... or after it; a loss that is not finite
            model.zero_grad()
    first, blown, bad = (r.flow for r in w.history.records)
    assert (first.loss, first.verdict) == ("training loss", "healthy") and first.loss_value == pytest.approx(losses[0])
    assert blown.loss_value == pytest.approx(losses[1]) and losses[1] / losses[0] > 100
    found = re.fullmatch(r"the training loss (\S+) is (\S+)× step 0's \(> 100×\)", blown.reason)
    assert blown.verdict == "exploding" and found, blown.reason
    assert float(found.group(1)) == pytest.approx(losses[1], rel=5e-3)
    assert float(found.group(2)) == pytest.approx(losses[1] / losses[0], rel=0.05)
    assert blown.recommendation.startswith("lower the learning rate")
    assert (bad.verdict, bad.reason) == ("exploding", "the training loss is nan")
    assert str(w.verdicts).splitlines()[1].startswith("from step 1: exploding; the training loss")
    with resify.watch(model, every=1) as unseen:  # no loss given: nothing is judged on it
        F.mse_loss(model(x), 1000 * y).backward()
    assert unseen.history.records[0].flow.loss == "training loss (not seen)"


def test_a_step_whose_activations_blow_up_is_exploding():
    """Inputs 1,000× larger at step 2: every layer's RMS 1,000× step 0's, though within the step all is in scale."""
    model = _relu_mlp()
    x = torch.randn(32, 8)
    outputs = {}
    hooks = [
        model[i].register_forward_hook(lambda m, a, o, i=i: outputs.setdefault(i, []).append(o.detach()))
        for i in (0, 2, 4)
    ]
    with resify.watch(model, every=2) as w:
        for step in range(3):
            model(x * (1000 if step == 2 else 1)).square().mean().backward()
            model.zero_grad()
    for h in hooks:
        h.remove()
    start, step2 = (r.flow for r in w.history.records)
    assert start.verdict == "healthy"
    growth = {i: outputs[i][2].pow(2).mean().sqrt().item() / outputs[i][0].pow(2).mean().sqrt().item() for i in outputs}
    worst = max(growth, key=growth.__getitem__)
    assert min(growth.values()) > 100  # measured: about 1,000× in each layer
    assert step2.activation_growth == pytest.approx(start.activation_growth, rel=0.1)  # within the step: as before
    found = re.fullmatch(
        r"the activation RMS of '(\d)' is (\S+)× step 0's \(> 100×; 3 layer\(s\) past it\)", step2.reason
    )
    assert step2.verdict == "exploding" and found, step2.reason
    assert found.group(1) == str(worst) and float(found.group(2).replace(",", "")) == pytest.approx(
        growth[worst], rel=1e-3
    )
    assert {r.name: r.verdict for r in step2.layers} == {"0": "exploding", "2": "exploding", "4": "exploding"}
    assert w.verdicts.changes[1].layers == ("0", "2", "4")


def test_a_rezero_net_at_its_initial_gate_is_watched_as_gradient_flow_judges_it():
    model = _rezero_mlp(gate_init=0.0)
    x = torch.randn(8, 8)
    reference = resify.gradient_flow(model, x, loss_fn=lambda out: out.square().mean())
    with resify.watch(model, every=1) as w:
        model(x).square().mean().backward()
    _assert_same_flow(w.history.records[0].flow, reference, "rezero at 0")
    assert reference.verdict == "healthy" and reference.reason.startswith("every branch gate is 0")
