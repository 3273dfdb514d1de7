"""Errors and warnings that resify raises on purpose.

Every error derives from :class:`ResifyError`; the CLI turns it into a one-line message.
"""

from __future__ import annotations

__all__ = [
    "ResifyError",
    "TraceError",
    "InputError",
    "PlanError",
    "RewriteError",
    "ModelLoadError",
    "ResifyWarning",
]


class ResifyError(Exception):
    """Root of every error resify raises on purpose."""


class TraceError(ResifyError):
    """The model could not be captured as a graph, or the example input was rejected."""


class InputError(TraceError):
    """The example input is missing, or does not fit the model's forward (too many, unknown names,
    another device): the caller's input to fix, not the model (the CLI's exit status 2)."""


class PlanError(ResifyError):
    """The policy is invalid or cannot be applied to this model."""


class RewriteError(ResifyError):
    """The plan could not be carried out on the graph."""


class ModelLoadError(ResifyError):
    """A model file or spec could not be loaded (CLI)."""


class ResifyWarning(UserWarning):
    """A non-fatal surprise, such as a trace specialised on the example input's shape."""
