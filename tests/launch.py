"""Starting real multi-process runs from tests: torchrun with N ranks on gloo, killed whole on a timeout."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def descendants(pid: int) -> list[int]:
    """Every process below pid (from /proc): torchrun starts each rank in a session of its own, so killing the
    launcher's process group leaves the ranks running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL pid and every process below it, as a crash of the machine would (ranks included)."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def logged_steps(run_dir: Path) -> int:
    """Training steps a run directory's metrics.jsonl holds so far (event lines left out), 0 before it exists."""
    path = run_dir / "metrics.jsonl"
    return sum('"event"' not in ln for ln in path.read_text().splitlines()) if path.exists() else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(var, None)  # a launcher's variables from the calling process must not leak into the children
    env.update(extra)
    return env


def run(cmd: list[str], timeout: int = 300, env: dict[str, str] | None = None,
        check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in its own session; on a timeout kill the whole group (a hung rank must not outlive it)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])} ... did not finish in {timeout} s:\n{err[-4000:]}")
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{err[-6000:]}")
    return result


def torchrun(nproc: int, *args: str, timeout: int = 300, check: bool = True,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N ARGS` (a module with -m, or a script path)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), *args]
    return run(cmd, timeout=timeout, env=env, check=check)


def train_args(world, out, *extra: str) -> list[str]:
    """`clove_dist.train` arguments of a small, fast run on the session's synthetic world."""
    return ["--config", "configs/debug.yaml",
            "--set", f"data.train_shards={world.train_pattern}", "--set", f"run.output_dir={out}",
            "--set", "model.name=clove-micro", "--set", "data.batch_size=8", "--set", "data.num_workers=0",
            "--set", "negatives.style=none", "--set", "run.log_every=1", "--set", "optim.warmup_steps=1",
            "--set", "patching.alphas=[]", *extra]
