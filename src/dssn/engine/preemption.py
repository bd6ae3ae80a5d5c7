"""Stopping cleanly on SIGTERM or SIGUSR1: what SLURM (``--signal``), Kubernetes and most
schedulers send before a time limit or a preemption.

The handler only records the signal; the training loop looks at it between optimizer steps, so
the step in progress finishes, rank 0 writes a checkpoint (atomically, like every checkpoint) and
every rank stops. A second signal while the checkpoint is being written is recorded and ignored:
nothing is interrupted half-way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from types import FrameType, TracebackType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """Within ``with StopSignals() as stop:``, SIGTERM and SIGUSR1 set ``stop.received`` (the first
    one's name) instead of ending the process; the previous handlers come back on exit. Outside the
    main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def requeue_slurm_job() -> str:
    """``scontrol requeue $SLURM_JOB_ID`` (``train.requeue``): what happened, for the log. Never
    raises: the checkpoint is already written, and a failed requeue leaves the run resumable by hand."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "train.requeue: not under SLURM (no SLURM_JOB_ID); not requeued"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"warning: scontrol requeue {job} failed ({err}); resubmit the job by hand"
    if done.returncode != 0:
        return f"warning: scontrol requeue {job} exited {done.returncode}: {done.stderr.strip()}; resubmit by hand"
    return f"SLURM job {job} requeued (scontrol requeue {job})"
