"""Preemption: a signal asks the run to stop; at the next step boundary every rank agrees, saves and exits.

    stop = Preemption.install()              # SIGUSR1 (SLURM's warning before the time limit) and SIGTERM
    ...
    if stop.agreed(device):                  # once per step, on every rank: one 1-element all-reduce
        save a checkpoint; exit with PREEMPTED_EXIT

The handler only records the signal: nothing unsafe runs inside it. A signal reaches the ranks at different moments
(or only some of them), so the decision is a MAX all-reduce of a flag at the same step on every rank; no rank ever
stops alone and leaves the others waiting in a collective.

slurm/train.sh asks SLURM for SIGUSR1 some minutes before the time limit (`#SBATCH --signal=B:USR1@...`), forwards
it to the training tasks, and requeues the job when training exits with PREEMPTED_EXIT; the requeued job resumes at
the step saved here. SIGTERM (scancel, a node drain) saves the same way; requeueing is then SLURM's decision.
"""
from __future__ import annotations

import signal
from typing import Any

import torch

from . import dist as cdist

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"; slurm/train.sh requeues on it
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preemption:
    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    @classmethod
    def install(cls, signals: tuple[int, ...] = SIGNALS) -> "Preemption":
        self = cls()
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, device: torch.device) -> bool:
        """Collective: True on every rank when any rank has received a stop signal."""
        return cdist.any_rank(self.received is not None, device)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
