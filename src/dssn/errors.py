"""The base of every error dssn reports to a user as a plain message (no traceback)."""


class DssnError(Exception):
    """A user-facing error: the message names the file, key or line and what to do."""


class TrainingError(DssnError, RuntimeError):
    """Training cannot go on (non-finite loss, unusable run folder)."""


PREEMPTED_EXIT_STATUS = 75
"""``dssn train``'s exit status after a SIGTERM/SIGUSR1 stop with its checkpoint written (EX_TEMPFAIL
of sysexits.h: run the same command again to resume)."""


class TrainingPreempted(TrainingError):
    """Training stopped on SIGTERM or SIGUSR1 after a checkpoint of its last step; not a failure."""

    exit_status = PREEMPTED_EXIT_STATUS
