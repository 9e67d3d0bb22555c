"""The process environment as launchers set it: srun on several nodes, torchrun, GPU requests without CUDA."""
from __future__ import annotations

import json
import sys

import pytest
from launch import REPO, cpu_env, free_port, run, train_args

from clove_dist import dist as cdist
from clove_dist.errors import UserError

PROBE = """
import json, os
from clove_dist import dist as cdist
env = cdist.setup("auto", "gloo")
import torch.distributed as dist
print(json.dumps({"rank": env.rank, "world": env.world_size, "local_rank": env.local_rank,
                  "local_world": env.local_world_size, "launcher": env.launcher, "device": str(env.device),
                  "group_rank": dist.get_rank(), "group_world": dist.get_world_size()}))
"""


def test_tasks_per_node_from_slurm(monkeypatch):
    for var in ("LOCAL_WORLD_SIZE", "SLURM_STEP_TASKS_PER_NODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "4(x2),1")
    monkeypatch.setenv("SLURM_NODEID", "1")
    assert cdist.tasks_on_this_node(9) == 4
    monkeypatch.setenv("SLURM_NODEID", "2")
    assert cdist.tasks_on_this_node(9) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun's own variable wins inside a torchrun worker
    assert cdist.tasks_on_this_node(9) == 3


def test_more_ranks_than_gpus_is_one_line():
    assert cdist.cuda_index(3, 4, 8) == 3
    assert cdist.cuda_index(5, 8, 1) == 0  # one GPU bound to each task: every task sees its own as device 0
    with pytest.raises(UserError, match="8 ranks on this node but 4 GPU"):
        cdist.cuda_index(0, 8, 4)


@pytest.mark.parametrize("var,value", [("SLURM_GPUS_ON_NODE", "8"), ("SLURM_JOB_GPUS", "0,1")])
def test_slurm_gpu_allocation_without_cuda_is_an_error(monkeypatch, var, value):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv(var, value)
    with pytest.raises(UserError, match=f"GPUs were asked for .*{var}={value}.* CUDA is not available"):
        cdist.pick_device("auto", 0)
    monkeypatch.setenv(var, "0")  # `--gpus-per-node 0`: the CPU debug job of slurm/train.sh's header
    assert str(cdist.pick_device("auto", 0)) == "cpu"


def test_train_asking_for_cuda_without_it_is_one_line(world, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run([sys.executable, "-m", "clove_dist.train", *train_args(world, tmp_path, "--set", "run.device=cuda")],
               check=False, timeout=120)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "run.device: cuda" in errors[0] and "CUDA is not available" in errors[0]
    assert not (tmp_path / "debug").exists()


@pytest.mark.multiproc
def test_srun_on_two_nodes_simulated(tmp_path):
    """4 tasks with the variables srun sets for 2 nodes x 2 tasks: ranks, local ranks and node-local counts."""
    import subprocess
    port = free_port()
    procs = []
    for rank in range(4):
        env = cpu_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % 2), SLURM_NODEID=str(rank // 2),
                      SLURM_NTASKS="4", SLURM_STEP_ID="0", SLURM_TASKS_PER_NODE="2(x2)", SLURM_JOB_ID="4242",
                      SLURM_JOB_NUM_NODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK="0", WORLD_SIZE="1")  # a launcher's leftovers from the submitting shell are ignored
        procs.append(subprocess.Popen([sys.executable, "-c", PROBE], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, cwd=tmp_path))
    seen = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        seen.append(json.loads(out.strip().splitlines()[-1]))
    assert [s["rank"] for s in seen] == [0, 1, 2, 3] == [s["group_rank"] for s in seen]
    assert {s["world"] for s in seen} == {4} == {s["group_world"] for s in seen}
    assert [s["local_rank"] for s in seen] == [0, 1, 0, 1]
    assert {s["local_world"] for s in seen} == {2} and {s["launcher"] for s in seen} == {"slurm"}
    assert {s["device"] for s in seen} == {"cpu"}


@pytest.mark.multiproc
@pytest.mark.slow
def test_torchrun_two_nodes_on_one_machine(world, tmp_path):
    """`torchrun --nnodes 2`: two launchers (one a node) rendezvous and train one run with a global batch of 2."""
    import subprocess
    port = free_port()
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "clove_dist.train", *train_args(world, tmp_path, "--set", "train.max_steps=2")]
        procs.append(subprocess.Popen(cmd, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=REPO, start_new_session=True))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "debug" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and lines[-1]["samples"] == 2 * 2 * 8


SLOW_RANK0 = """
import datetime, json, sys, time
from pathlib import Path
import torch.distributed as dist
from clove_dist import dist as cdist
from clove_dist.errors import UserError
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))  # far shorter than rank 0's work

def work(seconds, fail=False):
    time.sleep(seconds)
    if fail:
        raise UserError("checkpoint X cannot be converted: a reason")
    return "step000000002_universal"

out = {"value": cdist.from_rank0_long(lambda: work(8))}
try:
    cdist.from_rank0_long(lambda: work(1, fail=True))
except UserError as e:
    out["error"] = str(e)
try:  # the others' own limit: 1 s against 4 s of work
    out["third"] = cdist.from_rank0_long(lambda: work(4), timeout=datetime.timedelta(seconds=1))
except UserError as e:
    out["third"] = str(e)
dist.barrier()  # nobody leaves while another rank still works
Path(sys.argv[1], f"rank{dist.get_rank()}.json").write_text(json.dumps(out))  # not stdout: lines would interleave
"""


def test_rank0_work_longer_than_the_group_timeout(tmp_path):
    """Converting a large checkpoint on rank 0 can outlast the process group's timeout: the other ranks wait on
    the rendezvous store with a limit of their own, not in a collective, and learn of a failure as the same line."""
    script = tmp_path / "slow.py"
    script.write_text(SLOW_RANK0)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(free_port()), str(script), str(tmp_path)], timeout=120)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        assert r["value"] == "step000000002_universal"
        assert r["error"] == "checkpoint X cannot be converted: a reason"
    # rank 0 finished its 4 s of work; rank 1 gave up after its 1 s limit, with one line
    assert results[0]["third"] == "step000000002_universal"
    assert results[1]["third"].startswith("waited for rank 0 in vain")
