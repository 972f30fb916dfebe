"""Constants shared across layers (no imports: every module may use them)."""

IGNORE_INDEX = -100
"""Label of a position that has no target (prompt, padding); PyTorch's cross-entropy default."""
