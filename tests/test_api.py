"""The public entry points: plan and apply, their documented keywords, and conversions in threads."""

import dataclasses
import gc
import threading
import traceback

import pytest
import torch
import torch.nn as nn

import resify

_WAIT = 30.0  # seconds: a step that takes longer means a deadlock, not a slow machine


class Step(nn.Module):
    """Calls ``step()`` from forward. Kept whole (``leaf_modules``), it runs once per conversion: when
    its shape is found on meta tensors, inside the conversion but after the (one-at-a-time) trace."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def forward(self, x):
        self.step()
        return x


def _convert_in_threads(first_step, second_step, first_done=None):
    """apply() in two threads at once (``first_done`` is set when the first returns); returns the
    errors either thread raised."""
    errors = []

    def run(step, done):
        try:
            model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Step(step), nn.Linear(4, 4))
            resify.apply(model, torch.randn(2, 4), leaf_modules=[Step])
        except BaseException as e:  # reported by the test, not lost in the thread
            errors.append(e)
        finally:
            done.set()

    dones = (first_done or threading.Event(), threading.Event())
    threads = [threading.Thread(target=run, args=args) for args in zip((first_step, second_step), dones)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(_WAIT)
    assert not any(t.is_alive() for t in threads), "a conversion thread did not finish"
    return errors


def test_a_conversion_that_ends_first_leaves_the_collector_paused_for_the_one_still_running():
    first_inside, second_inside, first_done = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():  # enters first, leaves first
        first_inside.set()
        assert second_inside.wait(_WAIT)

    def second():  # enters while the first runs, looks at the collector once the first has returned
        assert first_inside.wait(_WAIT)
        seen["while_both_run"] = gc.isenabled()
        second_inside.set()
        assert first_done.wait(_WAIT)
        seen["after_the_first_returned"] = gc.isenabled()

    assert gc.isenabled()
    errors = _convert_in_threads(first, second, first_done)
    assert errors == [], [traceback.format_exception(e) for e in errors]
    assert seen == {"while_both_run": False, "after_the_first_returned": False}
    assert gc.isenabled()  # the last one out turned it back on


def test_a_collector_the_user_turned_off_stays_off_after_concurrent_conversions():
    gc.disable()
    try:
        errors = _convert_in_threads(lambda: None, lambda: None)
        assert errors == []
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_collector_is_back_on_after_a_conversion_that_fails():
    with pytest.raises(resify.PlanError, match="unknown policy keyword"):
        resify.apply(nn.Linear(4, 4), torch.randn(2, 4), no_such_keyword=1)
    assert gc.isenabled()


@pytest.mark.parametrize("entry", [resify.plan, resify.apply])
def test_every_policy_keyword_is_documented(entry):
    missing = [f.name for f in dataclasses.fields(resify.Policy) if f"``{f.name}``" not in entry.__doc__]
    assert missing == []
    assert "``'dense'``" in resify.plan.__doc__ and "example_kwargs:" in resify.plan.__doc__
