"""Which shards each rank and worker reads: as many ranks as a cluster runs, simulated by the launcher's variables."""
from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
import webdataset as wds

from clove_dist.config import DataConfig
from clove_dist.data.pipeline import shard_stages, stream_seed


def _urls_read(monkeypatch, data_cfg: DataConfig, urls: list[str], seed: int, rank: int, world: int) -> list[str]:
    """Every URL rank `rank` of `world` reads with its DataLoader workers (real worker processes)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    pipeline = wds.DataPipeline(*shard_stages(data_cfg, urls, seed))
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=data_cfg.num_workers)
    return [sample["url"] for sample in loader]


@pytest.mark.parametrize("step_at_epoch_end", [(0, 0, 0, 0), (13, 17, 13, 20)])
def test_one_pass_reads_every_shard_once_per_epoch(monkeypatch, step_at_epoch_end):
    """4 ranks x 2 workers, 2 epochs: every shard exactly once per epoch, whatever step each rank reached the new
    epoch at (uneven data makes ranks finish an epoch at different steps)."""
    urls = [f"shard-{i:05d}.tar" for i in range(37)]  # not a multiple of 8 readers
    data_cfg = dataclasses.replace(DataConfig(), resampled=False, num_workers=2)
    for epoch in (0, 1):
        read = collections.Counter()
        orders = []
        for rank in range(4):
            seed, _ = stream_seed(run_seed=3, resampled=False, step=step_at_epoch_end[rank], epoch=epoch)
            got = _urls_read(monkeypatch, data_cfg, urls, seed, rank, 4)
            read.update(got)
            orders.append(got)
        assert sorted(read) == sorted(urls) and set(read.values()) == {1}, epoch
        if epoch == 0:
            first = orders
    assert first != orders  # each epoch is another permutation


def test_resampled_ranks_draw_different_shards(monkeypatch):
    urls = [f"shard-{i:05d}.tar" for i in range(64)]
    data_cfg = dataclasses.replace(DataConfig(), resampled=True, num_workers=1)
    seed, _ = stream_seed(run_seed=0, resampled=True, step=0, epoch=0)
    draws = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        pipeline = wds.DataPipeline(*shard_stages(data_cfg, urls, seed))
        it = iter(torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=1))
        draws.append([next(it)["url"] for _ in range(20)])
    assert draws[0] != draws[1]  # ranks must not read the same shard sequence
