"""Beside the pipeline: the gradient-flow report of any ``nn.Module``, and the comparison of two.

``measure`` runs the forward and backward (``gradient_flow``) through the hooks of ``probe``, which
take each layer's figures (``figures``: gradients, and the activations' scale and similarity);
``facts`` says what the model has (its applied plan, its norms, gates still at zero); ``verdicts``
applies the rules (the forward signal's in ``signal``; thresholds in ``resify.constants``) and
compares two reports; ``records`` holds the frozen results and their JSON. ``watch`` takes the same
figures at every N-th backward of a training loop, and ``history`` holds its records. Printing is the
job of ``resify.views``.
docs/report.md explains the figures, the verdicts and the JSON schema.
"""

from .measure import gradient_flow
from .records import FlowComparison, GradientFlow, LayerChange, LayerFlow
from .verdicts import compare

__all__ = ["LayerFlow", "GradientFlow", "LayerChange", "FlowComparison", "gradient_flow", "compare"]
