"""`sbatch slurm/train.sh` on a real SLURM cluster (the one-node cluster CI brings up): two srun tasks become two
ranks of one DeepSpeed run. Skipped, with the reason, where no cluster answers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.multiproc, pytest.mark.slow]


def _cluster_reason() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "sbatch not installed (CI starts one with ../shared/tools/slurm-local-up.sh)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo failed: {e}"
    states = out.stdout.split()
    if out.returncode != 0 or not states:
        return f"no SLURM cluster answers: {out.stderr.strip()[:200]}"
    if not any(s in ("idle", "mix") for s in states):
        return f"no idle SLURM node (states: {', '.join(states)})"
    return None


def test_sbatch_two_tasks_train(world, tmp_path, request):
    reason = _cluster_reason()
    if reason:
        pytest.skip(reason)
    repo = request.config.rootpath
    log = tmp_path / "job.out"
    cmd = ["sbatch", "--wait", "--ntasks", "2", "--ntasks-per-node", "2", "--cpus-per-task", "1",
           "--time", "00:10:00", f"--output={log}", "slurm/train.sh", "configs/debug.yaml",
           "--set", f"data.train_shards={world.train_pattern}", "--set", f"run.output_dir={tmp_path}",
           "--set", "model.name=clove-micro", "--set", "data.batch_size=8", "--set", "data.num_workers=0",
           "--set", "negatives.style=none", "--set", "run.log_every=1", "--set", "train.max_steps=2",
           "--set", "patching.alphas=[]"]
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    output = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, f"{proc.stderr}\n{output[-4000:]}"
    assert "2 tasks on 1 node(s)" in output
    lines = [json.loads(x) for x in (tmp_path / "debug" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]
    assert lines[-1]["samples"] == 2 * 2 * 8  # two ranks: the global batch is twice the per-task batch
    assert (tmp_path / "debug" / "export" / "finetuned.safetensors").is_file()
