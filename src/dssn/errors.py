"""The base of every error dssn reports to a user as a plain message (no traceback)."""


class DssnError(Exception):
    """A user-facing error: the message names the file, key or line and what to do."""


class TrainingError(DssnError, RuntimeError):
    """Training cannot go on (non-finite loss, unusable run folder)."""
