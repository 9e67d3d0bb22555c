"""Preemption: a signal asks the run to stop; at the next step boundary every rank agrees, saves and exits.

    stop = Preemption.install()              # SIGUSR1 (SLURM's warning before the time limit), SIGTERM, SIGUSR2
    ...
    code = all_max(stop.code)                # once per step, on every rank: one small all-reduce
    if Preemption.name(code):                # the same answer on every rank
        save a checkpoint; exit with PREEMPTED_EXIT

The handler only records the signal: nothing unsafe runs inside it. A signal reaches the ranks at different moments
(or only some of them), so the decision is a MAX all-reduce of a flag at the same step on every rank; no rank ever
stops alone and leaves the others waiting in a collective.

A signal that arrives while Python is still importing torch would kill the process (the default action of SIGUSR1
and SIGTERM): `python -m clove_dist.train` installs the handlers before its first heavy import, and a later
`install()` returns that same recorder, so a signal received during start-up is acted on at the first step.
This module imports nothing heavy for that reason.

slurm/train.sh asks SLURM for SIGUSR1 some minutes before the time limit (`#SBATCH --signal=B:USR1@...`) and
forwards it to the training tasks. Once every rank has saved, rank 0 requeues the job (`scontrol requeue`: SLURM's
`--requeue` alone does not requeue a job that reaches its time limit); the requeued job resumes at the step saved
here. SIGTERM saves the same way, without a requeue. Under srun a SIGTERM must not reach srun itself (it kills the
tasks): slurm/train.sh turns a SIGTERM it gets into SIGUSR2 for the tasks, which counts as SIGTERM here, and the
graceful stop of a job is `scancel --batch --signal=TERM JOBID` (`scancel JOBID` alone signals srun too). Outside SLURM the
process exits with PREEMPTED_EXIT.
"""
from __future__ import annotations

import signal
from typing import Any

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2)
# Agreement codes, the largest wins: a warning before the time limit (requeue) outranks a plain stop request.
# SIGUSR2 is how slurm/train.sh passes a SIGTERM on: srun turns a SIGTERM it receives into SIGKILL of its tasks.
_CODES = {"SIGTERM": 1, "SIGUSR2": 1, "SIGUSR1": 2}
_NAMES = {1: "SIGTERM", 2: "SIGUSR1"}


class Preemption:
    _installed: "Preemption | None" = None

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    @classmethod
    def install(cls, signals: tuple[int, ...] = SIGNALS) -> "Preemption":
        """Record these signals from now on (idempotent: returns the recorder already installed)."""
        if cls._installed is not None:
            return cls._installed
        self = cls()
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        cls._installed = self
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    @property
    def code(self) -> int:
        """This rank's request as a number to MAX-reduce over ranks (0: none)."""
        return _CODES.get(self.received or "", 0)

    @staticmethod
    def name(code: int) -> str | None:
        """The signal a MAX-reduced code stands for, or None."""
        return _NAMES.get(code)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if Preemption._installed is self:
            Preemption._installed = None


def requeue_slurm_job() -> str | None:
    """Put this SLURM job back in the queue (it is stopped and restarted later with the same id); rank 0 only,
    after every rank has saved. Returns an error line, or None when the job was requeued."""
    import os
    import subprocess
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "not a SLURM job"
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"scontrol requeue {job} failed: {e}"
    return None if proc.returncode == 0 else f"scontrol requeue {job}: {proc.stderr.strip()[:200]}"
