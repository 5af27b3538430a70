"""Parity: compare a candidate's logits with the PyTorch reference's on the same inputs.

The comparison itself is numpy only and lives on the device side (edgeft.runtime.compare), so
the device runs the same checks on its own outputs.
"""

from .runtime.compare import Thresholds, checks, compare

__all__ = ["Thresholds", "checks", "compare"]
