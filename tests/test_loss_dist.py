"""ContrastiveLoss on 2 gloo ranks equals one process on the concatenated batch, loss and every gradient.

    pytest tests/test_loss_dist.py

Each rank holds B images and texts and its own number of negatives (zero on one rank in some cases, some of them
masked). After the engine's averaging over ranks (emulated here by dividing by the world size, as DDP and DeepSpeed
do), every feature gradient and logit_scale's gradient must equal the gradient of the single-process loss on the
global batch, whose negatives are all ranks' valid negatives.
"""
from __future__ import annotations

import datetime
import math
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

pytestmark = pytest.mark.multiproc

WORLD = 2
# name: (batch per rank, dim, negatives per rank, masked-out negative indices per rank, impl)
SCENARIOS = {
    "zero_negatives_on_rank1": (5, 16, (3, 0), ((1,), ()), "chunked"),
    "unequal_negatives": (4, 8, (2, 7), ((), (0, 6)), "reference"),
    "no_negatives_anywhere": (3, 8, (0, 0), ((), ()), "chunked"),
    "one_sample_per_rank": (1, 8, (0, 4), ((), (2,)), "chunked"),
}


def scenario_data(name):
    """The global batch of a scenario, identical on every rank and in the parent: per-rank lists."""
    batch, dim, counts, masked, _ = SCENARIOS[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    unit = lambda n: F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)  # noqa: E731
    images = [unit(batch) for _ in range(WORLD)]
    texts = [unit(batch) for _ in range(WORLD)]
    negatives = [unit(n) for n in counts]
    masks = []
    for n, bad in zip(counts, masked):
        mask = torch.ones(n, dtype=torch.bool)
        mask[list(bad)] = False
        masks.append(mask)
    logit_scale = torch.tensor([math.log(1 / 0.07)], dtype=torch.float64)  # shape [1], as DeepSpeed needs it
    return images, texts, negatives, masks, logit_scale


def _worker(rank, port, out_path):
    from clove_dist.loss import ContrastiveLoss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, (_, _, _, _, impl) in SCENARIOS.items():
            images, texts, negatives, masks, logit_scale = scenario_data(name)
            leaves = [t.clone().requires_grad_(True) for t in (images[rank], texts[rank], negatives[rank],
                                                                 logit_scale)]
            loss = ContrastiveLoss(impl=impl, chunk_size=4)(leaves[0], leaves[1], leaves[3], leaves[2], masks[rank])
            loss.backward()
            results[name] = [loss.detach()] + [t.grad for t in leaves]
        # Unequal batch sizes are a user error every rank reports the same way.
        size = 3 if rank == 0 else 4
        feats = F.normalize(torch.randn(size, 8, dtype=torch.float64), dim=1)
        try:
            ContrastiveLoss(impl="chunked")(feats, feats, torch.zeros(()))
            results["unequal_batch"] = "no error"
        except ValueError as e:
            results["unequal_batch"] = str(e)
    finally:
        torch.save(results, out_path)
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_loss(images, texts, logit_scale, negatives):
    """Plain-torch CLoVe loss on the whole batch: rows are all images / all texts, negatives extra text columns."""
    scale = logit_scale.reshape(()).exp().clamp(max=100.0)
    labels = torch.arange(images.shape[0])
    i2t = F.cross_entropy(scale * images @ torch.cat([texts, negatives]).T, labels)
    t2i = F.cross_entropy(scale * texts @ images.T, labels)
    return (i2t + t2i) / 2


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("loss_dist")
    paths = [out / f"rank{r}.pt" for r in range(WORLD)]
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(paths[r]))) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 180
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(p) for p in paths]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_equal_single_process(rank_results, name):
    images, texts, negatives, masks, logit_scale = scenario_data(name)
    leaves = [torch.cat(images).requires_grad_(True), torch.cat(texts).requires_grad_(True),
              logit_scale.clone().requires_grad_(True)]
    valid = [n[m] for n, m in zip(negatives, masks)]
    negatives_all = torch.cat(valid).requires_grad_(True)
    ref = single_process_loss(leaves[0], leaves[1], leaves[2], negatives_all)
    ref.backward()
    batch = images[0].shape[0]
    ref_neg_grads = list(negatives_all.grad.split([int(m.sum()) for m in masks]))

    per_rank = [r[name] for r in rank_results]
    # The losses are fp32 (about 7 significant digits); the gradients stay fp64, so only rounding separates them.
    mean_loss = sum(float(r[0]) for r in per_rank) / WORLD
    assert mean_loss == pytest.approx(float(ref.detach()), rel=1e-6)
    for rank, (_, d_images, d_texts, d_negatives, d_scale) in enumerate(per_rank):
        rows = slice(rank * batch, (rank + 1) * batch)
        torch.testing.assert_close(d_images / WORLD, leaves[0].grad[rows], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(d_texts / WORLD, leaves[1].grad[rows], rtol=1e-10, atol=1e-12)
        if negatives[rank].shape[0]:
            mask = masks[rank]
            torch.testing.assert_close(d_negatives[mask] / WORLD, ref_neg_grads[rank], rtol=1e-10, atol=1e-12)
            if bool((~mask).any()):
                assert float(d_negatives[~mask].abs().sum()) == 0.0  # masked negatives get no gradient
    # logit_scale is replicated: the engine averages it once, so the mean of the rank gradients is the answer.
    mean_scale_grad = sum(r[4] for r in per_rank) / WORLD
    torch.testing.assert_close(mean_scale_grad, leaves[2].grad, rtol=1e-10, atol=1e-12)


def test_unequal_batch_sizes_are_a_clear_error(rank_results):
    for r in rank_results:
        assert r["unequal_batch"] == "every rank must have the same batch size, got [3, 4] (rank order)"
