"""Sharded evaluation: every rank encodes every world_size-th image and text, features are gathered, and every
rank computes the same metrics from the same full set of features.

    shard = Shard.current()          # from torch.distributed; None outside a process group or with one rank
    evaluate_all(model, preprocess, tokenizer, ..., shard=shard)   # same result on every rank

Item i (in the evaluator's own deterministic order: sorted file names, tar sample order) belongs to rank
i % world_size. Each rank needs the full model (under ZeRO-3: every rank keeps the gathered weights), and every
rank must make the same sequence of calls: the gathers are collectives (`all_gather_object`, on the default
process group, so NCCL needs the rank's CUDA device set, as training has). Errors that depend only on the files
(a missing directory, a malformed JSON) are raised by every rank alike before any gather; counts that decide
strict mode are summed over ranks first, so strict failures are raised by every rank too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Shard:
    rank: int
    world_size: int

    def mine(self, index: int) -> bool:
        return index % self.world_size == self.rank

    @staticmethod
    def current() -> "Shard | None":
        """This process's shard of the default process group; None without one or with a single rank."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return Shard(dist.get_rank(), dist.get_world_size())


def active(shard: Shard | None) -> bool:
    return shard is not None and shard.world_size > 1


def all_gather(obj: Any, shard: Shard | None) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...]; [obj] when not sharded."""
    if not active(shard):
        return [obj]
    import torch.distributed as dist
    out: list[Any] = [None] * shard.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_rows(indices: list[int], rows: torch.Tensor, extras: list[Any], shard: Shard | None
                ) -> tuple[list[int], torch.Tensor, list[Any]]:
    """Every rank's (global index, feature row, extra) merged in global-index order: (indices, (N, D), extras)."""
    if not active(shard):
        return indices, rows, extras
    parts = all_gather((indices, rows, extras), shard)
    merged = sorted(((i, r, e) for idx, rs, ex in parts for i, r, e in zip(idx, rs if len(idx) else [], ex)),
                    key=lambda t: t[0])
    if not merged:
        return [], torch.empty(0, 0), []
    return [m[0] for m in merged], torch.stack([m[1] for m in merged]), [m[2] for m in merged]


def sum_counts(counts: dict[str, int], shard: Shard | None) -> dict[str, int]:
    """Counts summed over ranks (each rank counted only its own items)."""
    if not active(shard):
        return counts
    total: dict[str, int] = {}
    for part in all_gather(counts, shard):
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return total


__all__ = ["Shard", "active", "all_gather", "gather_rows", "sum_counts"]
