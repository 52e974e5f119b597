"""Pruning callbacks (paper A's stages run inside one fit, paper B) and the compression report helpers."""

from callbacks.selection import FilterSelection
from callbacks.sparsity import SparsityInduction
from callbacks.state import Phase
from callbacks.surgery import StructuredSurgery

__all__ = ["FilterSelection", "Phase", "SparsityInduction", "StructuredSurgery"]
