"""The adapter inspector: the gate an adapter passes before loraq publishes it (see :mod:`.adapter`).

Torch-free to import: the structure and value checks read safetensors with numpy;
the checks against a base model (:mod:`.on_base`) import torch when they run.
"""

from . import serving
from .adapter import inspect_adapter
from .safetensors import check_finite
from .structure import Finding, Findings, Inspection
from .verdict import exact_match_gate, metric_gate, quality_gate, verdict

__all__ = ["serving", "Finding", "Findings", "Inspection", "check_finite", "exact_match_gate", "inspect_adapter",
           "metric_gate", "quality_gate", "verdict"]
