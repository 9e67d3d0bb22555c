"""Resuming on another number of ranks (a requeued job that got fewer or more GPUs): DeepSpeed's universal
checkpoint conversion runs automatically, and the weights loaded are exactly the ones saved. ZeRO-3 with every
parameter partitioned, the hardest case to reshard."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from launch import run, torchrun, train_args
from safetensors.torch import load_file

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def _args(world, out, steps: int) -> list[str]:
    return ["-m", "clove_dist.train", *train_args(world, out, "--set", f"train.max_steps={steps}",
                                                  "--set", "distributed.zero_stage=3",
                                                  "--set", "distributed.stage3_param_persistence_threshold=0")]


def _export_again(run_dir) -> dict[str, torch.Tensor]:
    """The last export, removed so that the next run at the same step loads the checkpoint and exports anew."""
    path = run_dir / "export" / "finetuned.safetensors"
    state = load_file(str(path))
    path.unlink()
    return state


def _assert_same(a, b, what):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=f"{what}: {k}")  # a reload, not a computation


def test_two_ranks_to_one_and_back(world, tmp_path):
    run_dir = tmp_path / "debug"
    torchrun(2, *_args(world, tmp_path, 2))
    saved_by_two = _export_again(run_dir)
    run([sys.executable, *_args(world, tmp_path, 2)], timeout=300)  # 1 rank loads the 2-rank checkpoint
    _assert_same(saved_by_two, load_file(str(run_dir / "export" / "finetuned.safetensors")), "2 -> 1")
    run([sys.executable, *_args(world, tmp_path, 3)], timeout=300)  # and trains on
    saved_by_one = _export_again(run_dir)
    torchrun(2, *_args(world, tmp_path, 3))  # 2 ranks load the 1-rank checkpoint
    _assert_same(saved_by_one, load_file(str(run_dir / "export" / "finetuned.safetensors")), "1 -> 2")
    torchrun(2, *_args(world, tmp_path, 4))
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "event" not in r] == [1, 2, 3, 4]
    resumed = [(r["step"], r["world_size"]) for r in records if r.get("event") == "resumed"]
    assert resumed == [(2, 1), (2, 1), (3, 2), (3, 2)]
