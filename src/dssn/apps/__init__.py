"""User tasks built on the engine: train (with its report), evaluate a checkpoint, predict,
export, the demo and sweeps. The command line calls these; so can Python code."""
