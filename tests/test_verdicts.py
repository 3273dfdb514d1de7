"""resify.report.verdicts: layer and model verdicts, their reasons, the advice, ``judge_step`` and ``compare``."""

import math

import pytest

import resify
from resify.errors import ResifyError
from resify.report.facts import ModelFacts
from resify.report.history import LOSS_SEEN, StepFlow
from resify.report.records import GradientFlow, LayerFlow
from resify.report.verdicts import Advice, advice, compare, judge, judge_step, layer_verdict, recommend

_EVERY = "adds a shortcut around every layer"
_TRAINING = "lower the learning rate, or clip the gradient norm (torch.nn.utils.clip_grad_norm_)"


def rec(name, flow, *, kind="Linear", added=False, mean=1.0, gnorm=1.0, rms=1.0, sim=None):
    """A record whose input-gradient norm (the figure the verdict is judged on) is ``flow``."""
    return LayerFlow(name, kind, 0, added, (2, 2), mean, gnorm, 1.0, flow, rms, activation_similarity=sim)


def flow_of(*records, facts=None, loss="mse to zeros", loss_value=1.0):
    return judge(tuple(records), facts=facts, model_class="M", loss=loss, loss_value=loss_value)


@pytest.mark.parametrize(
    "record,last,ratios,verdict",
    [
        (rec("a", 0.5e-2), 1.0, True, "vanishing"),  # flow ÷ last below 1e-2
        (rec("a", 0.5e-2), 1.0, False, "healthy"),  # ... not where the branches learn through gates at 0
        (rec("a", 2e-2), 1.0, True, "healthy"),
        (rec("a", 2e3), 1.0, True, "exploding"),  # above 1e3
        (rec("a", 2e6), None, True, "exploding"),  # above 1e6, whatever the last
        (rec("a", 1.0), 0.0, True, "healthy"),  # no last figure: no ratio
        (rec("a", None, gnorm=None), 1.0, True, "healthy"),
        (rec("a", 1.0, mean=math.nan), 1.0, True, "exploding"),  # a figure not finite
        (rec("a", 1.0, rms=math.inf), 1.0, True, "exploding"),
        (rec("g", 1e-9, kind="Gate"), 1.0, True, "healthy"),  # a gate has no verdict of its own
        (rec("g", 1.0, kind="Gate", mean=math.inf), 1.0, True, "exploding"),  # ... unless not finite
    ],
)
def test_layer_verdict(record, last, ratios, verdict):
    assert layer_verdict(record, last, ratios=ratios) == verdict


# moved from test_report.py
@pytest.mark.parametrize(
    "first,last,verdict",
    [
        (1.0, 1.0, "healthy"),
        (0.5e-2, 1.0, "vanishing"),
        (2e-2, 1.0, "healthy"),
        (2e3, 1.0, "exploding"),
        (5e2, 1.0, "healthy"),
        (1e-11, 1e-11, "vanishing"),
        (2e6, 2e6, "exploding"),
        (math.inf, 1.0, "exploding"),
    ],
)
def test_documented_thresholds(first, last, verdict):
    flow = flow_of(rec("a", first), rec("b", last))
    assert flow.verdict == verdict
    assert (flow.recommendation is None) == (verdict == "healthy")


@pytest.mark.parametrize(
    "records,verdict,reason",
    [
        (
            (rec("a", 5e-3), rec("b", 1.0)),
            "vanishing",
            "input gradient first/last = 5.00e-03 (< 0.01) from 'a' to 'b'",
        ),
        ((rec("a", 1e-11), rec("b", 1e-11)), "vanishing", "the first layer's input gradient is 1.00e-11 (< 1e-10)"),
        ((rec("a", 2e3), rec("b", 1.0)), "exploding", "input gradient grows 2,000× (> 1000×) from 'a' to 'b'"),
        ((rec("a", 2e6), rec("b", 2e6)), "exploding", "a gradient norm reaches 2.00e+06 (> 1e+06)"),
        ((rec("a", 1.0), rec("b", math.inf)), "exploding", "a gradient or activation is not finite at 'b'"),
        (
            (rec("a", 0.5), rec("b", 1.0)),
            "healthy",
            "input gradient first/last = 5.00e-01 (within 0.01…1000) from 'a' to 'b'",
        ),
    ],
)
def test_judge_gives_the_verdict_and_the_figure_it_rests_on(records, verdict, reason):
    flow = flow_of(*records)
    assert (flow.verdict, flow.reason) == (verdict, reason)
    assert flow.first_to_last == pytest.approx(records[0].flow / records[1].flow)  # (1 / inf: 0)
    assert (flow.recommendation is None) == (verdict == "healthy")
    assert flow.model_class == "M" and flow.loss_value == 1.0


def test_an_integer_input_first_layer_is_judged_by_its_weight_gradient():
    emb = rec("emb", None, kind="Embedding", gnorm=1e-4)  # token ids: no input gradient
    flow = flow_of(emb, rec("a", 1.0, gnorm=2.0), rec("b", 1.0, gnorm=1.0))
    assert flow.verdict == "vanishing" and flow.first_to_last == 1.0
    assert flow.reason.endswith(
        "from 'a' to 'b'; 'emb' before it (integer input) gets 1.00e-04 of the last layer's weight gradient (< 0.01)"
    )
    assert flow_of(rec("emb", None, kind="Embedding", gnorm=0.5), rec("a", 1.0)).verdict == "healthy"


def test_the_activation_growth_is_an_explosion_in_the_forward():
    flow = flow_of(rec("a", 1.0, rms=1.0), rec("b", 1.0, rms=500.0))
    assert flow.verdict == "exploding" and flow.activation_growth == 500.0
    assert [r.verdict for r in flow.layers] == ["healthy", "exploding"]


def test_advice_for_each_verdict():
    plain = [rec(f"l{i}", 1.0) for i in range(3)]
    deep = [rec(f"l{i}", 1.0) for i in range(32)]
    converted = [*plain, rec("l0.resify.0.proj", 1.0, added=True)]
    gated = [*converted, rec("l0.resify.0.alpha", None, kind="Gate", added=True)]
    assert advice("healthy", plain) == ()
    assert advice("vanishing", plain) == (Advice((("shortcut", "auto"),), _EVERY),)
    (deep_advice,) = advice("vanishing", deep)
    assert deep_advice.settings == (("gate", "rezero"),) and "which trains 32 layers in series" in deep_advice.effect
    assert [a.settings for a in advice("vanishing", converted)] == [
        (("shortcut", "auto"), ("group", 1)),
        (("gate", "rezero"),),
    ]
    assert [a.settings for a in advice("exploding", plain)] == [(("gate", "rezero"),)]
    assert [a.settings for a in advice("exploding", gated)] == [(("gate", "rezero"), ("gate_init", 0.0))]
    assert advice("exploding", gated, ModelFacts(gates_at_zero=True)) == ()
    collapsing = advice("collapsing", plain)
    assert [a.settings for a in collapsing] == [(("gate", "rezero"),), ()]
    assert collapsing[1].effect == "add normalisation (LayerNorm or BatchNorm) inside its blocks"
    assert advice("collapsing", converted, ModelFacts(normalised=True)) == ()
    eval_mode = advice("vanishing", plain, ModelFacts(batch_norm_eval=True))
    assert eval_mode[0].settings == () and eval_mode[0].effect.startswith(
        "if it is untrained, measure it in train mode"
    )
    assert advice("healthy", plain, ModelFacts(batch_norm_eval=True)) == ()


def test_advice_in_python_and_what_a_policy_does_not_use_yet():
    a = Advice((("shortcut", "auto"), ("group", 1)), "does it")
    assert a.python() == "try shortcut='auto', group=1: resify.apply(model, shortcut='auto', group=1) does it"
    assert Advice((), "change the model").python() == "change the model"
    assert a.unused(resify.Policy()) == ()  # both are the defaults
    assert a.unused(resify.Policy(shortcut="identity", group=2)) == (("shortcut", "auto"), ("group", 1))
    init = Advice((("gate", "rezero"), ("gate_init", 0.0)), "starts at zero")
    assert init.unused(resify.Policy(gate="rezero")) == ()  # rezero's own start is 0
    assert init.unused(resify.Policy(gate="layerscale")) == (("gate", "rezero"), ("gate_init", 0.0))
    assert (
        recommend("vanishing", [rec("a", 1.0)]) == f"try shortcut='auto': resify.apply(model, shortcut='auto') {_EVERY}"
    )
    assert recommend("healthy", [rec("a", 1.0)]) is None


def _step(loss_value, *rms, verdict="healthy", loss=LOSS_SEEN):
    layers = tuple(rec(f"l{i}", 1.0, rms=r) for i, r in enumerate(rms))
    return GradientFlow("M", layers, verdict, "why", None, 1.0, loss, loss_value)


def test_judge_step_against_the_first_step():
    start = StepFlow(3, _step(0.5, 1.0, 2.0), {})
    same = _step(0.6, 1.0, 2.0)
    assert judge_step(same, start) is same and judge_step(same, None) is same
    grown = judge_step(_step(60.0, 1.0, 2.0), start)  # 120× the first loss
    assert grown.verdict == "exploding" and grown.reason == "the training loss 6.00e+01 is 120× step 3's (> 100×)"
    assert grown.recommendation == _TRAINING
    assert judge_step(_step(50.0, 1.0, 2.0), start).verdict == "healthy"  # 100× exactly: not above
    nan = judge_step(_step(math.nan, 1.0, 2.0), None)
    assert nan.verdict == "exploding" and nan.reason == "the training loss is nan"
    unseen = _step(math.nan, 1.0, 2.0, loss="training loss (not seen)")
    assert judge_step(unseen, start) is unseen  # no loss given: NaN says nothing
    louder = judge_step(_step(0.5, 150.0, 2.0), start)
    assert louder.verdict == "exploding" and [r.verdict for r in louder.layers] == ["exploding", "healthy"]
    assert louder.reason == "the activation RMS of 'l0' is 150× step 3's (> 100×; 1 layer(s) past it)"
    already = _step(0.5, 1.0, verdict="exploding")
    assert judge_step(already, start) is already


def test_compare_refuses_other_types():
    flow = flow_of(rec("a", 1.0))
    with pytest.raises(ResifyError, match="^compare takes two GradientFlow reports, found GradientFlow and str; make"):
        compare(flow, "after")


@pytest.mark.parametrize(
    "before,after,headline",
    [
        ((rec("a", 1.0, mean=2.0),), (rec("a", 1.0, mean=6.0),), "first layer: 3.0× more gradient"),
        ((rec("a", 1.0, mean=4.0),), (rec("a", 1.0, mean=1.0),), "first layer: 4.0× less gradient"),
        ((rec("a", 2.0, mean=4.0),), (rec("a", 5.0, mean=0.0),), "first layer: 2.5× more input gradient"),
        (
            (rec("a", None, gnorm=None, mean=0.0),),
            (rec("a", None, gnorm=None, mean=0.0),),
            "first layer: mean |grad| 0 → 0",
        ),
        ((rec("a", 1.0),), (rec("b", 1.0),), "no layer in common"),
    ],
)
def test_the_headline(before, after, headline):
    c = compare(flow_of(*before), flow_of(*after))
    assert c.headline.startswith(headline + "; verdict ")


def test_compare_matches_layers_by_name_and_skips_gates_for_the_first_ratio():
    before = flow_of(rec("g", 1.0, kind="Gate", mean=5.0), rec("a", 1.0, mean=2.0), rec("old", 1.0))
    after = flow_of(rec("new", 1.0, added=True), rec("g", 1.0, kind="Gate", mean=50.0), rec("a", 1.0, mean=3.0))
    c = compare(before, after)
    assert [ch.name for ch in c.layers] == ["g", "a"] and [r.name for r in c.added] == ["new"]
    assert c.removed == ("old",) and c.first_layer_ratio == 1.5


def test_an_output_louder_than_the_originals_is_exploding():
    before = flow_of(rec("a", 1.0, rms=1.0), rec("b", 1.0, rms=1.0))
    # the output 200× the original's, but within 100× of its own first layer: not exploding by itself
    after = flow_of(rec("a", 1.0, rms=5.0), rec("b", 1.0, rms=200.0))
    assert after.verdict == "healthy"
    c = compare(before, after)
    assert c.after.verdict == "exploding" and c.output_ratio == 200.0
    assert c.after.reason == "the output's activation RMS at 'b' is 200× the original's (> 100×)"
    assert c.headline.endswith("verdict healthy → exploding")
    # a conversion that restores a signal the original lost: the output no louder than its first layer
    restored = compare(
        flow_of(rec("a", 1.0, rms=1.0), rec("b", 1.0, rms=0.001)),
        flow_of(rec("a", 1.0, rms=1.0), rec("b", 1.0, rms=1.0)),
    )
    assert restored.output_ratio == 1000.0 and restored.after.verdict == "healthy"
