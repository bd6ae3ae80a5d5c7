"""Values every layer agrees on."""

IGNORE = 255
"""The label of pixels that no loss and no score counts (boundaries, padding)."""
