"""resify: add residual shortcuts to a PyTorch model by graph surgery, and show the gradient flow."""

from .analysis.analyze import ExistingShortcut, Layer
from .api import apply, plan
from .checkpoint import load, remove, save
from .errors import InputError, ModelLoadError, PlanError, ResifyError, ResifyWarning, RewriteError, TraceError
from .planning.policy import Policy
from .planning.sites import SKIP_CODES, Dense, Identity, Plan, Projection, Site, Skipped
from .report import FlowComparison, GradientFlow, LayerChange, LayerFlow, compare, gradient_flow
from .report.history import FlowHistory, StepFlow, VerdictChange, VerdictTimeline
from .report.watch import Watch, watch
from .rewriting.install import applied_plan
from .rewriting.modules import DualGraphModule, Shortcut
from .tracing.units import WHOLE_CODES, WholeModule

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "apply",
    "plan",
    "applied_plan",
    "save",
    "load",
    "remove",
    "Plan",
    "Policy",
    "Site",
    "Identity",
    "Projection",
    "Dense",
    "Skipped",
    "SKIP_CODES",
    "WholeModule",
    "WHOLE_CODES",
    "ExistingShortcut",
    "Layer",
    "ResifyError",
    "TraceError",
    "InputError",
    "PlanError",
    "RewriteError",
    "ModelLoadError",
    "ResifyWarning",
    "gradient_flow",
    "compare",
    "watch",
    "Watch",
    "GradientFlow",
    "FlowComparison",
    "LayerFlow",
    "LayerChange",
    "FlowHistory",
    "StepFlow",
    "VerdictChange",
    "VerdictTimeline",
    "DualGraphModule",
    "Shortcut",
]


def __dir__() -> list[str]:
    """The documented surface only: the modules inside resify are its internals."""
    return sorted(__all__)
