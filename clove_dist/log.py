"""Rank-aware printing: one helper so that only rank 0 talks, and each fallback or warning is said once.

The rank comes from torch.distributed when it is initialised, else from the launcher's RANK / SLURM_PROCID, so
messages printed before the process group exists are filtered too.
"""
from __future__ import annotations

import os
import sys

_said: set[str] = set()


def rank() -> int:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


def is_main() -> bool:
    return rank() == 0


def log(msg: str, *, all_ranks: bool = False) -> None:
    """Print a line to stderr on rank 0 (or on every rank, prefixed with the rank)."""
    if all_ranks:
        print(f"[rank {rank()}] {msg}", file=sys.stderr, flush=True)
    elif is_main():
        print(msg, file=sys.stderr, flush=True)


def warn_once(msg: str) -> None:
    """Print `WARNING: msg` once per process, on rank 0."""
    if msg in _said:
        return
    _said.add(msg)
    log(f"WARNING: {msg}")
