"""Shared fixtures: a small synthetic world written once per session, CPU DeepSpeed, GPU tests skipped without CUDA."""
from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before any DeepSpeed import: no CUDA probing on CPU machines

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A few hundred training samples in 4 shards, plus the SugarCrepe-format and zero-shot sets."""
    from clove_dist.data.synthetic import write_world
    return write_world(tmp_path_factory.mktemp("world"), seed=0, num_train=256, samples_per_shard=64,
                       num_eval_per_subset=8, num_zeroshot_per_class=2, image_size=32, progress=False)
