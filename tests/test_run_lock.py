"""One run per run directory: a second run started on the directory of a live one (a job submitted twice) is
refused with one line naming the holder, before it reads or writes anything there; killed with SIGKILL, the
holder leaves no stale lock and the same command then trains. Real runs, started as users start them."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from launch import REPO, cpu_env, kill_tree, logged_steps, torchrun, train_args

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def test_second_run_on_a_live_directory_is_refused_until_the_first_dies(world, tmp_path):
    run_dir = tmp_path / "debug"
    first = subprocess.Popen([sys.executable, "-m", "clove_dist.train",
                              *train_args(world, tmp_path, "--set", "train.max_steps=100000")],
                             cwd=REPO, env=cpu_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        start = time.monotonic()
        while logged_steps(run_dir) < 1 and first.poll() is None and time.monotonic() - start < 180:
            time.sleep(0.1)
        assert first.poll() is None and logged_steps(run_dir) >= 1, "the first run did not start training"
        assert f"pid {first.pid} on " in (run_dir / "run.lock").read_text()
        second = torchrun(2, "-m", "clove_dist.train", *train_args(world, tmp_path, "--set", "train.max_steps=2"),
                          check=False)
        assert second.returncode != 0
        refusals = [ln for ln in second.stderr.splitlines() if ln.startswith("error: ")]
        assert len(refusals) == 2, second.stderr[-3000:]  # each rank: one line, no traceback
        assert all(f"is in use by another run (pid {first.pid} on " in ln for ln in refusals)
        assert not re.search(r'File ".*clove_dist/', second.stderr)  # no traceback through the project's code
        assert first.poll() is None  # the first run goes on, its directory untouched by the second
        assert "resumed" not in (run_dir / "metrics.jsonl").read_text()
    finally:
        kill_tree(first.pid)
        first.wait()
    torchrun(2, "-m", "clove_dist.train", *train_args(world, tmp_path, "--set", "train.max_steps=2"))
    assert (run_dir / "export" / "finetuned.safetensors").is_file()
