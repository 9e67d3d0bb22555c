"""The commands README.md and the script headers print, run exactly as written (where this machine can run them):
a newcomer copies them, so a command that fails as written is a bug."""
from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest
from launch import REPO, cpu_env
from test_slurm import _cluster_reason

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def _commands(text: str) -> list[str]:
    """Shell commands of the ```bash blocks (or '#   ' header lines) of a text, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [ln for b in blocks for ln in b.splitlines()]
    out, cur = [], ""
    for ln in lines:
        ln = re.sub(r"\s+#\s.*$", "", ln).rstrip()  # trailing comment
        cur += ln[:-1] + " " if ln.endswith("\\") else ln
        if not ln.endswith("\\"):
            if cur.strip():
                out.append(" ".join(cur.split()))
            cur = ""
    return out


def _header_commands(path) -> list[str]:
    """The usage lines of a script or config header: '#   command', continued with '\\'."""
    lines = [ln[1:].strip() for ln in path.read_text().splitlines()
             if ln.startswith("#   ") or ln.startswith("#       ")]
    return _commands("```bash\n" + "\n".join(lines) + "\n```")


def _workdir(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    for sub in ("configs", "slurm"):
        (d / sub).symlink_to(REPO / sub)
    return d


def _sh(cmd: str, cwd, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=cpu_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"`{cmd}` failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def test_shard_patterns_are_quoted_everywhere():
    """Unquoted braces are expanded by the shell (60,000 arguments for LAION-COCO)."""
    texts = [(REPO / "README.md").read_text(), (REPO / "slurm" / "train.sh").read_text(),
             *(p.read_text() for p in (REPO / "configs").glob("*.yaml"))]
    for text in texts:
        for m in re.finditer(r"train_shards=(\S+)", text):
            assert m.group(1)[0] in "'\"", m.group(0)


def test_readme_training_commands_run_as_written(tmp_path):
    readme = _commands((REPO / "README.md").read_text().split("## Training", 1)[1].split("\n## ", 1)[0])
    world_cmd = next(c for c in readme if c.startswith("clove-dist world"))
    train_cmd = next(c for c in readme if c.startswith("clove-dist train"))
    torchrun_cmd = next(c for c in readme if c.startswith("torchrun"))
    data = _workdir(tmp_path, "data_home")
    _sh(world_cmd, data)
    for name, cmd in (("single", train_cmd), ("torchrun", torchrun_cmd)):
        d = _workdir(tmp_path, name)
        (d / "data").symlink_to(data / "data")
        _sh(cmd, d)
        records = [json.loads(x) for x in (d / "runs" / "debug" / "metrics.jsonl").read_text().splitlines()]
        ranks = 2 if name == "torchrun" else 1
        assert records[-1]["samples"] == 1280 // (32 * ranks) * 32 * ranks, name  # debug.yaml: 1,280 samples
        assert (d / "runs" / "debug" / "export" / "finetuned.safetensors").is_file(), name
    # the on-demand sharded patch of "The other commands", on the torchrun run it names
    other = _commands((REPO / "README.md").read_text().split("## The other commands", 1)[1].split("\n## ", 1)[0])
    patch_cmd = next(c for c in other if c.startswith("torchrun") and "--checkpoint runs/debug" in c)
    _sh(patch_cmd, d)
    tag = (d / "runs" / "debug" / "checkpoints" / "latest").read_text().strip()
    assert sorted(p.name for p in (d / "runs" / "debug" / "export" / tag).glob("*.safetensors")) == [
        "finetuned.safetensors", "patched_alpha0.4.safetensors", "patched_alpha0.6.safetensors"]
    # debug.yaml's header prints the same world command, and a train command that differs only in its override
    header = _header_commands(REPO / "configs" / "debug.yaml")
    assert header[0] == world_cmd
    assert header[1].startswith("clove-dist train --config configs/debug.yaml --set data.train_shards=")


def test_slurm_header_debug_command_runs_as_written(tmp_path):
    reason = _cluster_reason()
    if reason:
        pytest.skip(reason)
    cmd = next(c for c in _header_commands(REPO / "slurm" / "train.sh") if "configs/debug.yaml" in c)
    d = _workdir(tmp_path, "sbatch")
    _sh(shlex.join(["clove-dist", "world", "--out", "data/world", "--num-train", "2000",
                    "--samples-per-shard", "500"]), d)
    _sh(cmd.replace("sbatch ", "sbatch --wait ", 1), d, timeout=900)
    records = [json.loads(x) for x in (d / "runs" / "debug" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 20 and records[-1]["samples"] == 1280  # 2 tasks x 32 per step
    assert (d / "runs" / "debug" / "export" / "finetuned.safetensors").is_file()
    log = next(p for p in d.iterdir() if p.name.startswith("clove-") and p.suffix == ".out")
    assert "2 tasks on 1 node(s)" in log.read_text(errors="replace")  # progress bars may be cut mid-character
