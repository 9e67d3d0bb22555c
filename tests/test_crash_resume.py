"""kill -9 at any moment loses at most the steps since the last complete checkpoint; a partial or damaged checkpoint
is never loaded. Real 2-rank torchrun runs, killed whole (launcher and ranks) with SIGKILL."""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest
from launch import REPO, cpu_env, free_port, kill_tree, logged_steps, run, train_args

from clove_dist.checkpoint import MANIFEST

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

STEPS = 60


def _command(world, out) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), "-m", "clove_dist.train",
            *train_args(world, out, "--set", f"train.max_steps={STEPS}", "--set", "checkpoint.every_steps=1",
                        "--set", "checkpoint.keep_last=2")]


def _partial_tags(ckpt_dir) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    return [int(p.name[4:]) for p in ckpt_dir.glob("step?????????") if p.is_dir() and not (p / MANIFEST).exists()]


def _kill_when(world, out, delay_s: float, mid_save: bool) -> list[int]:
    """Start a run and SIGKILL it (launcher and ranks) delay_s after it logged its first new step, or, with
    mid_save, as soon as a checkpoint directory exists without its manifest; returns the steps of the partial
    checkpoints left behind."""
    before = logged_steps(out / "debug")
    proc = subprocess.Popen(_command(world, out), cwd=REPO, env=cpu_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt_dir = out / "debug" / "checkpoints"
    start, trained_at = time.monotonic(), None
    while proc.poll() is None and time.monotonic() - start < 180:
        if mid_save and before < logged_steps(out / "debug") and _partial_tags(ckpt_dir):
            break
        if not mid_save:
            if trained_at is None and logged_steps(out / "debug") > before:
                trained_at = time.monotonic()
            if trained_at is not None and time.monotonic() - trained_at >= delay_s:
                break
        time.sleep(0.005 if mid_save else 0.05)
    assert proc.poll() is None, "the run ended before it could be killed: make STEPS larger"
    kill_tree(proc.pid)  # the launcher and both ranks (torchrun puts each rank in a session of its own)
    proc.wait()
    return _partial_tags(ckpt_dir)


def test_kill_9_five_times_then_finish(world, tmp_path):
    rng = random.Random(7)
    resumed_at: list[int] = []
    partial_seen = []
    for i in range(5):
        partial = _kill_when(world, tmp_path, delay_s=rng.uniform(0.0, 1.5), mid_save=(i == 2))
        partial_seen.append(partial)
    assert partial_seen[2], "the kill aimed at a checkpoint write found no partial checkpoint"
    run(_command(world, tmp_path), timeout=300)
    records = [json.loads(x) for x in (tmp_path / "debug" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "event" not in r]
    assert steps == list(range(1, STEPS + 1)), steps  # every step exactly once, however often it was redone
    resumed_at = [r["step"] for r in records if r.get("event") == "resumed"]
    assert resumed_at == sorted(resumed_at)
    # the run killed in the middle of a save resumed from an older, complete checkpoint
    assert all(step not in resumed_at for step in partial_seen[2])
    assert (tmp_path / "debug" / "export" / "finetuned.safetensors").is_file()


def test_damaged_checkpoint_is_one_line_and_nothing_is_overwritten(world, tmp_path):
    args = [sys.executable, "-m", "clove_dist.train", *train_args(world, tmp_path, "--set", "train.max_steps=2")]
    run(args, timeout=180)
    ckpt = tmp_path / "debug" / "checkpoints"
    tag = (ckpt / "latest").read_text()
    shard = next(p for p in sorted((ckpt / tag).iterdir()) if p.name.endswith(".pt"))
    shard.write_bytes(shard.read_bytes()[:100])  # a disk that lost the end of a file
    metrics_before = (tmp_path / "debug" / "metrics.jsonl").read_text()
    proc = run([*args[:-1], "train.max_steps=4"], timeout=180, check=False)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"checkpoint {ckpt / tag} is damaged: {shard.name} has 100 bytes" in errors[0]
    assert (tmp_path / "debug" / "metrics.jsonl").read_text() == metrics_before
    assert (ckpt / "latest").read_text() == tag


def test_finished_run_submitted_again_says_complete(world, tmp_path):
    args = [sys.executable, "-m", "clove_dist.train", *train_args(world, tmp_path, "--set", "train.max_steps=2")]
    run(args, timeout=180)
    again = run(args, timeout=180)
    assert "is already complete: 2 steps" in again.stderr and "nan" not in again.stderr
