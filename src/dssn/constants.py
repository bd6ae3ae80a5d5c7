"""Values every layer agrees on."""

IGNORE = 255
"""The label of pixels that no loss and no score counts (boundaries, padding)."""

NETWORK_CHOICES = ("auto", "student", "teacher", "model")
"""Which network of a weights file to use: ``auto`` (the best-scoring on its last evaluation),
``student``/``teacher`` (dssn checkpoints) or ``model`` (the one network of a released file)."""
