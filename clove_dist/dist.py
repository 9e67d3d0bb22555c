"""Process environment: SLURM (srun), torchrun, or a single process with no launcher at all.

    srun python -m clove_dist.train --config ...        # SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID
    torchrun --nproc_per_node 2 -m clove_dist.train ... # RANK / WORLD_SIZE / LOCAL_RANK / MASTER_*
    clove-dist train --config configs/debug.yaml        # single process: nothing to set

`setup()` fills the variables DeepSpeed expects (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; without
them `deepspeed.init_distributed` tries MPI and fails) and initialises the process group itself before DeepSpeed
sees it: nccl on CUDA, gloo on CPU.
"""
from __future__ import annotations

import atexit
import datetime
import json
import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # slurm | torchrun | single
    device: torch.device
    local_world_size: int = 1  # ranks on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if nodelist:
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return "127.0.0.1"


def detect() -> tuple[int, int, int, str, int, str]:
    """(rank, world_size, local_rank, master_addr, master_port, launcher) from the environment."""
    env = os.environ
    srun_task = "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1
    if "RANK" in env and "WORLD_SIZE" in env and not (srun_task and "TORCHELASTIC_RUN_ID" not in env):
        return (int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if srun_task:  # one task per rank; a RANK inherited from the submitting shell does not count
        job = int(env.get("SLURM_JOB_ID", "0"))
        return (int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                env.get("MASTER_ADDR") or _slurm_master_addr(),
                int(env.get("MASTER_PORT") or default_port(job)), "slurm")
    return 0, 1, 0, "127.0.0.1", _free_port(), "single"


def default_port(job_id: int) -> int:
    """Rendezvous port of a SLURM job without MASTER_PORT; slurm/train.sh computes the same."""
    return 20000 + job_id % 20000


def tasks_on_this_node(world_size: int) -> int:
    """How many ranks share this node, from the launcher (SLURM_TASKS_PER_NODE such as "2(x3),1", or torchrun's
    LOCAL_WORLD_SIZE); the whole world for a single process or an unknown launcher."""
    env = os.environ
    if "LOCAL_WORLD_SIZE" in env:
        return int(env["LOCAL_WORLD_SIZE"])
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec and "SLURM_PROCID" in env:
        counts: list[int] = []
        for part in spec.split(","):
            m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
            if not m:
                return world_size
            counts += [int(m.group(1))] * int(m.group(2) or 1)
        node = int(env.get("SLURM_NODEID", 0))
        return counts[node] if node < len(counts) else counts[-1]
    return world_size


def gpus_requested() -> str | None:
    """Why this process was meant to run on GPUs (a SLURM allocation with GPUs), or None."""
    env = os.environ
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_JOB_GPUS",
                "SLURM_STEP_GPUS"):
        value = env.get(var, "").strip()
        if value and value not in ("0", "(null)"):
            return f"the SLURM allocation has GPUs ({var}={value})"
    return None


def cuda_index(local_rank: int, local_world_size: int, device_count: int) -> int:
    """The GPU of a rank; refuses to put two ranks of one node on the same GPU."""
    if device_count == 1:  # one GPU bound to each task (--gpus-per-task 1, --gpu-bind): each sees its own as 0
        return 0
    if local_world_size > device_count:
        raise UserError(f"{local_world_size} ranks on this node but {device_count} GPU(s) visible: start one task "
                        f"per GPU (e.g. sbatch --ntasks-per-node {device_count}) or expose more GPUs")
    return local_rank


def pick_device(device: str, local_rank: int, local_world_size: int = 1) -> torch.device:
    asked = "run.device: cuda" if device == "cuda" else (gpus_requested() if device == "auto" else None)
    if asked and not torch.cuda.is_available():
        raise UserError(f"GPUs were asked for ({asked}) but CUDA is not available on this machine "
                        f"(torch {torch.__version__}); set run.device: cpu to train on CPU")
    if device in ("cuda", "auto") and torch.cuda.is_available():
        on_node = os.environ.get("SLURM_GPUS_ON_NODE", "")
        if on_node.isdigit() and 0 < int(on_node) < local_world_size:
            raise UserError(f"{local_world_size} ranks on this node but SLURM allocated {on_node} GPU(s) to it: "
                            f"start one task per GPU (e.g. sbatch --ntasks-per-node {on_node})")
        torch.cuda.set_device(cuda_index(local_rank, local_world_size, torch.cuda.device_count()))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_detected: tuple[int, int, int, str, int, str] | None = None


def setup(device: str = "auto", backend: str = "auto", timeout_minutes: int = 30) -> DistEnv:
    """Initialise the process group for whatever launcher started us; idempotent."""
    global _detected
    # Once the group exists, the environment holds the RANK/WORLD_SIZE this function wrote into it: detecting
    # again would call a single process "torchrun". The first detection stands for the life of the group.
    if _detected is None or not dist.is_initialized():
        _detected = detect()
    rank, world, local_rank, addr, port, launcher = _detected
    local_world = tasks_on_this_node(world)
    dev = pick_device(device, local_rank, local_world)
    if dev.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise UserError("distributed.backend: nccl needs CUDA; use gloo (or auto) on CPU")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR=addr, MASTER_PORT=str(port))
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=dev if dev.type == "cuda" else None)
        # One process group for the life of the process: DeepSpeed caches groups of it, so a second training run
        # in the same process (the demo, tests) must find the same one.
        atexit.register(teardown)
    return DistEnv(rank, world, local_rank, addr, port, launcher, dev, local_world)


def from_rank0(fn):
    """fn() evaluated on rank 0 and broadcast, so that every rank takes the same branch (e.g. of a file read).
    An error raised on rank 0 is raised on every rank (a UserError as itself, any other as one UserError line),
    so no rank waits for the others in vain."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", fn())]
        except UserError as e:
            box = [("error", e)]
        except Exception as e:  # an OSError reading the disk, say: every rank stops with the same line
            box = [("error", UserError(f"{type(e).__name__}: {e}"))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


_long_calls = 0  # from_rank0_long calls so far: the same count on every rank, which makes each call's store key


def from_rank0_long(fn: Callable[[], str], timeout: datetime.timedelta = datetime.timedelta(hours=12)) -> str:
    """from_rank0 for work that can outlast the process group's timeout (converting a large checkpoint): the other
    ranks wait on the rendezvous store with a timeout of their own, not inside a collective. The store's host going
    away (rank 0's job dying) ends the wait with an error. fn returns a string; its error reaches every rank as one
    line."""
    global _long_calls
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    _long_calls += 1
    store = dist.distributed_c10d._get_default_store()
    key = f"clove_dist/from_rank0_long/{_long_calls}"
    if dist.get_rank() == 0:
        outcome: dict[str, str] = {"error": "rank 0 stopped before it finished"}
        try:
            value = fn()
            outcome = {"value": value}
        except UserError as e:
            outcome = {"error": str(e)}
            raise
        except Exception as e:
            outcome = {"error": f"{type(e).__name__}: {e}"}
            raise
        finally:  # also on KeyboardInterrupt/SystemExit: the others must not wait out the timeout
            store.set(key, json.dumps(outcome))
    else:
        try:
            store.wait([key], timeout)
        except RuntimeError as e:  # timeout, or the store's host is gone
            raise UserError(f"waited for rank 0 in vain: {str(e).splitlines()[0][:200]}") from None
        outcome = json.loads(store.get(key))
        if "error" in outcome:
            raise UserError(outcome["error"])
        value = outcome["value"]
    return value


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (metrics); a no-op in a single process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def merge_counts(counts: dict[str, int]) -> dict[str, int]:
    """Sum named counters over ranks; ranks may know different names."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return dict(counts)
    parts: list[dict[str, int]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, dict(counts))
    total: dict[str, int] = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total.get(k, 0) + int(v)
    return dict(sorted(total.items()))


def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (a list of one in a single process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_max_ints(values: list[int], device: torch.device) -> list[int]:
    """The elementwise largest of a few integers over ranks: one all-reduce."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def all_max_int(value: int, device: torch.device) -> int:
    """The largest of an integer over ranks."""
    return all_max_ints([value], device)[0]
