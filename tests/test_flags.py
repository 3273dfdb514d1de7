"""resify.cli.flags: the policy keywords as click flags, the flags back to keywords, the advice in flags."""

import dataclasses
import json
import math

import click
import pytest
from click.testing import CliRunner

import resify
from resify.cli.flags import POLICY_FLAG_NAMES, _Number, advice_text, policy_from_flags, policy_options
from resify.planning.policy import Policy
from resify.report import GradientFlow, LayerFlow


@click.command()
@policy_options
def _cmd(**opts):
    """Print the keywords that policy_from_flags makes of the flags, as JSON."""
    click.echo(json.dumps(policy_from_flags(opts), sort_keys=True))


def run(*args):
    result = CliRunner().invoke(_cmd, list(args))
    return result.exit_code, result.output


def test_the_defaults_give_no_keyword():
    assert run() == (0, "{}\n")


@pytest.mark.parametrize(
    "args,keywords",
    [
        (["--shortcut", "dense"], {"shortcut": "dense"}),
        (["--group", "3"], {"group": 3}),
        (["--exclude", "a.*", "--exclude", "b"], {"exclude": ["a.*", "b"]}),
        (["--leaf", "Block"], {"leaf_modules": ["Block"]}),  # the flag is not --leaf-modules
        (["--gate", "none"], {"gate": None}),  # 'none' is None
        (["--gate", "rezero", "--gate-init", "0.5"], {"gate": "rezero", "gate_init": 0.5}),
        (["--gate-init", "-2"], {"gate_init": -2.0}),  # a number, not a limit: negative is allowed
        (["--preserve-output"], {"preserve_output": True}),
        (
            ["--shortcut", "dense", "--dense-max-growth", "4", "--gate", "none"],
            {"shortcut": "dense", "gate": None, "dense_max_growth": 4},
        ),
        (["--max-added", "none"], {"max_added": None}),
        (["--max-added", "NONE", "--projection-cost", "0"], {"max_added": None, "projection_cost": 0.0}),
        (["--max-added", "0.1"], {}),  # the default, given: left out
        (["--projection", "pad"], {"projection": "pad"}),
    ],
)
def test_flags_become_the_keywords_that_differ_from_the_defaults(args, keywords):
    code, out = run(*args)
    assert code == 0, out
    assert json.loads(out) == keywords
    resify.Policy.from_kwargs(**keywords)  # and the library takes them


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gate", "none", "--gate-init", "0.5"], "--gate-init needs a gate: found --gate-init 0.5 with --gate none"),
        (["--shortcut", "dense", "--gate", "rezero"], "--gate does not combine with --shortcut dense"),
        (["--dense-max-growth", "4"], "--dense-max-growth needs --shortcut dense: found --shortcut auto"),
        (["--max-added", "-1"], "expected a non-negative number or 'none', found '-1'"),
        (["--projection-cost", "inf"], "expected a non-negative number or 'none', found 'inf'"),
        (["--gate-init", "none"], "expected a finite number, found 'none'"),  # no 'none' for a number
        (["--gate-init", "nan"], "expected a finite number, found 'nan'"),
        (["--gate-init", "x"], "expected a finite number, found 'x'"),
        (["--group", "0"], "0 is not in the range x>=1"),
        (["--shortcut", "residual"], "'residual' is not one of 'auto', 'identity', 'dense'"),
    ],
)
def test_a_bad_flag_or_combination_is_a_usage_error_in_the_flags_words(args, message):
    code, out = run(*args)
    assert code == 2, out
    assert message in " ".join(out.split()), out
    assert "gate_init" not in out and "Traceback" not in out  # the flags' words, not Python's


def test_number_type_converts_directly():
    limit, number = _Number(non_negative=True, none=True), _Number(non_negative=False, none=False)
    assert limit.name == "non-negative number or 'none'" and number.name == "finite number"
    assert limit.convert("None", None, None) is None and limit.convert(None, None, None) is None
    assert limit.convert("0", None, None) == 0.0 and number.convert(-1.5, None, None) == -1.5
    for bad in (math.inf, "1e999", "-0.5"):
        with pytest.raises(click.BadParameter, match="expected a non-negative number or 'none'"):
            limit.convert(bad, None, None)


def test_there_is_a_flag_per_policy_field_in_its_order():
    assert tuple(f.name for f in dataclasses.fields(Policy)) == POLICY_FLAG_NAMES
    params = [p.name for p in _cmd.params]
    assert params[:3] == ["input_shapes", "dtype", "input_kwargs"] and params[3:] == list(POLICY_FLAG_NAMES)


def test_help_shows_each_flag_with_its_default():
    result = CliRunner().invoke(_cmd, ["--help"], terminal_width=200)
    text = " ".join(result.output.split())
    assert result.exit_code == 0
    for shown in ("--shortcut [auto|identity|dense]", "[default: auto]", "--leaf GLOB", "--input-shape SHAPE[:DTYPE]"):
        assert shown in text, shown
    assert "--group INTEGER RANGE Layers per shortcut. [default: 1; x>=1]" in text


# the report's advice in flags (moved from test_cli.py)


def _flow(verdict, added=False, gate=False):
    """A report of that verdict on three layers (with resify's projections and gates when asked)."""
    layers = []
    for i in range(3):
        layers.append(LayerFlow(f"l{i}", "Linear", len(layers), False, (2, 2), 1.0, 1.0, 1.0, 1.0, 1.0))
        if added:
            layers.append(LayerFlow(f"l{i}.proj", "Linear", len(layers), True, (2, 2), 1.0, 1.0, 1.0, 1.0, 1.0))
        if gate:
            layers.append(LayerFlow(f"l{i}.alpha", "Gate", len(layers), True, (1,), 1.0, 1.0, None, None, None))
    return GradientFlow("M", tuple(layers), verdict, "why", "(the library's)", None, "mse to zeros", 1.0)


ADVICE_IN_FLAGS = [
    # the original, vanishing: its advice is what the run does by default, or not
    (_flow("vanishing"), {}, None),
    (_flow("vanishing"), {"shortcut": "identity"}, "try --shortcut auto: adds a shortcut around every layer"),
    # converted and still vanishing: only the settings the run does not use, else the next advice
    (_flow("vanishing", True), {"group": 2}, "try --group 1: gives every layer, not only some, a shortcut"),
    (_flow("vanishing", True), {"shortcut": "identity", "group": 3}, "try --shortcut auto --group 1: gives every"),
    (_flow("vanishing", True), {}, "try --gate rezero: starts every branch at zero"),
    (_flow("vanishing", True), {"gate": "rezero"}, None),
    (_flow("exploding"), {}, "try --gate rezero: starts every branch at zero"),
    (_flow("exploding", True, True), {"gate": "rezero"}, None),  # gate_init 0 is rezero's own
    (_flow("exploding", True, True), {"gate": "rezero", "gate_init": 0.5}, "try --gate-init 0: starts every"),
    (_flow("exploding", True, True), {"gate": "layerscale"}, "try --gate rezero --gate-init 0: starts every"),
    (_flow("healthy"), {}, None),
    # the report itself advised nothing (it knew the model has what the advice would add)
    (dataclasses.replace(_flow("vanishing"), recommendation=None), {"shortcut": "identity"}, None),
]


@pytest.mark.parametrize("flow,policy,expected", ADVICE_IN_FLAGS)
def test_advice_text_words_the_advice_in_flags_the_run_does_not_use(flow, policy, expected):
    text = advice_text(flow, resify.Policy.from_kwargs(**policy))
    assert text == expected if expected is None else (text or "").startswith(expected), text
