"""resify.planning.skips: the plan's Skipped records, their codes and their dict form."""

import json
import typing

import pytest

from resify.planning.skips import SKIP_CODES, SkipCode, Skipped


def test_skip_codes_are_the_literal_in_order_and_unique():
    assert typing.get_args(SkipCode) == SKIP_CODES
    assert len(set(SKIP_CODES)) == len(SKIP_CODES)
    assert SKIP_CODES[0] == "excluded" and SKIP_CODES[-1] == "unrecorded"  # (schema 1 plans read as the last)
    assert all(c.isidentifier() and c == c.lower() for c in SKIP_CODES)


@pytest.mark.parametrize("code", SKIP_CODES)
def test_to_dict_and_from_dict_round_trip_through_json(code):
    s = Skipped("layers.0.0", "layers.1.0", code, f"because {code}")
    d = s.to_dict()
    assert d == {"start": "layers.0.0", "end": "layers.1.0", "code": code, "reason": f"because {code}"}
    assert Skipped.from_dict(json.loads(json.dumps(d))) == s


def test_a_schema_1_record_without_a_code_reads_as_unrecorded():
    s = Skipped.from_dict({"start": "a", "end": "b", "reason": "no shape"})
    assert s == Skipped("a", "b", "unrecorded", "no shape")


def test_from_dict_needs_start_end_and_reason():
    with pytest.raises(KeyError, match="reason"):
        Skipped.from_dict({"start": "a", "end": "b", "code": "stem"})


def test_skipped_is_frozen_and_hashable():
    s = Skipped("a", "b", "stem", "r")
    with pytest.raises(AttributeError):
        s.code = "excluded"  # type: ignore[misc]
    assert len({s, Skipped("a", "b", "stem", "r")}) == 1
