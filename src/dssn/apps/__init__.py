"""User tasks built on the engine: train (with its report), evaluate a checkpoint, predict,
export, the demo and sweeps. The command line calls these; so can Python code."""

# The built-in datasets register data.dataset=synthetic and =glyphs; importing dssn imports this package.
from dssn.apps import glyphs as _glyphs  # noqa: F401,E402
from dssn.apps import synthetic as _synthetic  # noqa: F401,E402
