"""Run several trainings one after another in the same ranks (one process group, as the demo does).

    torchrun --nproc_per_node 2 tests/scripts/train_many.py RUNS.json

RUNS.json: a list whose items are argument lists for `clove_dist.train.main`, or {"copy": [src, dst]} (rank 0
copies a file once the ranks are past the previous run). Any non-zero exit stops with that status.
"""
import json
import shutil
import sys

import torch.distributed as dist

from clove_dist.train import main

for item in json.loads(open(sys.argv[1]).read()):
    if isinstance(item, dict):
        if dist.is_initialized():
            dist.barrier()
        if not dist.is_initialized() or dist.get_rank() == 0:
            shutil.copy(*item["copy"])
        continue
    code = main(item)
    if code:
        raise SystemExit(code)
