"""The plan's skip records: a candidate span left out, with a stable ``code`` and a reason in prose."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

__all__ = ["SkipCode", "SKIP_CODES", "Skipped"]


SkipCode = Literal[
    "excluded",  # an exclude pattern matched, or include did not
    "inside_existing",  # the layer is inside a shortcut the model already has
    "stem",  # the convolution from the input's channels to the width of a network that has its shortcuts
    "gate_branch",  # the span only computes a gate (squeeze-excitation, attention weights, GLU)
    "group_remainder",  # fewer layers left than group=
    "not_single_entry_exit",  # a value joins or leaves the span between its input and output
    "bounded_output",  # the span ends in the model's bounded output activation
    "no_shape",  # no tensor shape was recorded
    "not_float",  # non-float tensors, or a dtype change across the span
    "identity_needs_same_shape",  # shortcut='identity' and the shape changes (at some input size)
    "rank_change",  # a flatten inside the span
    "linear_span",  # no activation, norm or pool: a projection would be one more linear map
    "unsupported_shape",  # a shape change no projection handles
    "no_consumer",  # dense: the span's output has no layer that can be widened
    "dense_growth",  # dense: more than dense_max_growth channels
    "mode_differs",  # the span differs between train and eval mode
    "projection_cost",  # a learned projection would cost more than projection_cost × the span's parameters
    "over_budget",  # the max_added budget was spent on sites of more value per parameter
    "unrecorded",  # read from a schema-1 plan, which had no codes
]
SKIP_CODES: tuple[SkipCode, ...] = get_args(SkipCode)


@dataclass(frozen=True)
class Skipped:
    """A candidate span that was not used: a stable ``code`` (see ``SkipCode``) and the reason in prose."""

    start: str
    end: str
    code: SkipCode
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Skipped:
        return cls(d["start"], d["end"], d.get("code", "unrecorded"), d["reason"])
