"""ContrastiveLoss on 2 and 4 gloo ranks equals one process on the concatenated batch, loss and every gradient.

    pytest tests/test_loss_dist.py

Each rank holds B images and texts and its own number of negatives (on some rank zero, None or all masked; some
masked elsewhere). After the engine's averaging over ranks (emulated here by dividing by the world size, as DDP and
DeepSpeed do), every feature gradient and logit_scale's gradient must equal the gradient of the single-process loss on the
global batch, whose negatives are all ranks' valid negatives. Every rank must also issue the same collectives in
forward and backward (a rank that skipped one would hang or mispair the others' calls).
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

# name: (world, batch per rank, dim, negatives per rank (None = the argument is None), masked-out negative
# indices per rank, impl). Every scenario has a rank without usable negatives: none, None, or all masked.
SCENARIOS = {
    "zero_negatives_on_rank1": (2, 5, 16, (3, 0), ((1,), ()), "chunked"),
    "none_negatives_on_rank1": (2, 5, 16, (3, None), ((1,), ()), "chunked"),
    "none_negatives_on_rank0_reference": (2, 4, 8, (None, 7), ((), (0, 6)), "reference"),
    "unequal_negatives": (2, 4, 8, (2, 7), ((), (0, 6)), "reference"),
    "no_negatives_anywhere": (2, 3, 8, (0, 0), ((), ()), "chunked"),
    "none_anywhere": (2, 3, 8, (None, None), ((), ()), "chunked"),
    "one_sample_per_rank": (2, 1, 8, (0, 4), ((), (2,)), "chunked"),
    "all_masked_on_rank0": (2, 3, 8, (2, 3), ((0, 1), ()), "chunked"),
    "four_ranks_uneven": (4, 3, 8, (2, None, 5, 0), ((), (), (1, 4), ()), "chunked"),
    "four_ranks_all_masked": (4, 2, 8, (3, 1, None, 2), ((0, 1, 2), (), (), (1,)), "chunked"),
    "four_ranks_reference": (4, 2, 8, (1, None, 3, 0), ((), (), (2,), ()), "reference"),
    # The Triton block kernels in the interpreter (set in each worker before triton is imported).
    "triton_none_negatives_on_rank1": (2, 5, 16, (4, None), ((2,), ()), "triton"),
}
COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast")


def scenario_data(name):
    """The global batch of a scenario, identical on every rank and in the parent: per-rank lists."""
    world, batch, dim, counts, masked, _ = SCENARIOS[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    unit = lambda n: F.normalize(torch.randn(n, dim, generator=gen, dtype=torch.float64), dim=1)  # noqa: E731
    images = [unit(batch) for _ in range(world)]
    texts = [unit(batch) for _ in range(world)]
    negatives = [None if n is None else unit(n) for n in counts]
    masks = []
    for n, bad in zip(counts, masked):
        if n is None:
            masks.append(None)
            continue
        mask = torch.ones(n, dtype=torch.bool)
        mask[list(bad)] = False
        masks.append(mask)
    logit_scale = torch.tensor([math.log(1 / 0.07)], dtype=torch.float64)  # shape [1], as DeepSpeed needs it
    return images, texts, negatives, masks, logit_scale


def _count_collectives(log):
    """Wrap torch.distributed's collectives so each call is logged by name (the calls still run)."""
    for fn_name in COLLECTIVES:
        original = getattr(dist, fn_name)

        def wrapped(*args, _original=original, _name=fn_name, **kwargs):
            log.append(_name)
            return _original(*args, **kwargs)
        setattr(dist, fn_name, wrapped)


def _worker(rank, world, port, out_path):
    import os
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported in this fresh process (spawn)
    import clove_kernels
    from clove_dist.loss import ContrastiveLoss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    log = []
    _count_collectives(log)
    try:
        for name, (w, _, _, _, _, impl) in SCENARIOS.items():
            if w != world:
                continue
            images, texts, negatives, masks, logit_scale = scenario_data(name)
            leaves = [None if t is None else t.clone().requires_grad_(True)
                      for t in (images[rank], texts[rank], negatives[rank], logit_scale)]
            del log[:]
            loss = ContrastiveLoss(impl=impl, chunk_size=4)(leaves[0], leaves[1], leaves[3], leaves[2], masks[rank])
            forward_calls = list(log)
            del log[:]
            loss.backward()
            results[name] = [loss.detach()] + [None if t is None else t.grad for t in leaves]
            results[name + ":collectives"] = (forward_calls, list(log))
            results[name + ":impl"] = clove_kernels.resolve_impl(impl, torch.device("cpu"))
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


def _run_ranks(out, world):
    paths = [out / f"rank{r}.pt" for r in range(world)]
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(paths[r]))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 240
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(p) for p in paths]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    return {world: _run_ranks(tmp_path_factory.mktemp(f"loss_dist_{world}"), world) for world in (2, 4)}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ranks_equal_single_process(rank_results, name):
    world = SCENARIOS[name][0]
    images, texts, negatives, masks, logit_scale = scenario_data(name)
    leaves = [torch.cat(images).requires_grad_(True), torch.cat(texts).requires_grad_(True),
              logit_scale.clone().requires_grad_(True)]
    valid = [n[m] for n, m in zip(negatives, masks) if n is not None]
    negatives_all = torch.cat(valid).requires_grad_(True) if valid else torch.zeros(0, images[0].shape[1],
                                                                                      dtype=torch.float64)
    ref = single_process_loss(leaves[0], leaves[1], leaves[2], negatives_all)
    ref.backward()
    batch = images[0].shape[0]
    num_valid = [0 if m is None else int(m.sum()) for m in masks]
    ref_neg_grads = list(negatives_all.grad.split(num_valid)) if valid else [None] * world

    per_rank = [r[name] for r in rank_results[world]]
    assert all(r[name + ":impl"] == SCENARIOS[name][5] for r in rank_results[world])  # no silent fallback
    # The losses are fp32 (about 7 significant digits); the gradients stay fp64, so only rounding separates them.
    # Triton computes fp64 inputs in fp32: fp32 rounding of logits up to 14.3 over ~20 columns, ~1e-6 relative.
    tol = dict(rtol=1e-4, atol=1e-5) if SCENARIOS[name][5] == "triton" else dict(rtol=1e-10, atol=1e-12)
    mean_loss = sum(float(r[0]) for r in per_rank) / world
    assert mean_loss == pytest.approx(float(ref.detach()), rel=1e-6)
    for rank, (_, d_images, d_texts, d_negatives, d_scale) in enumerate(per_rank):
        rows = slice(rank * batch, (rank + 1) * batch)
        torch.testing.assert_close(d_images / world, leaves[0].grad[rows], **tol)
        torch.testing.assert_close(d_texts / world, leaves[1].grad[rows], **tol)
        if negatives[rank] is not None and negatives[rank].shape[0]:
            mask = masks[rank]
            torch.testing.assert_close(d_negatives[mask] / world, ref_neg_grads[rank], **tol)
            if bool((~mask).any()):
                assert float(d_negatives[~mask].abs().sum()) == 0.0  # masked negatives get no gradient
    # logit_scale is replicated: the engine averages it once, so the mean of the rank gradients is the answer.
    mean_scale_grad = sum(r[4] for r in per_rank) / world
    torch.testing.assert_close(mean_scale_grad, leaves[2].grad, **tol)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_rank_issues_the_same_collectives(rank_results, name):
    world = SCENARIOS[name][0]
    calls = [r[name + ":collectives"] for r in rank_results[world]]
    assert all(c == calls[0] for c in calls), calls
    forward_calls, backward_calls = calls[0]
    assert forward_calls.count("all_gather") <= 4  # counts, [texts; negatives], mask, images (two-direction path)
    assert backward_calls, "the backward must reduce the gathered gradients on every rank"


def test_unequal_batch_sizes_are_a_clear_error(rank_results):
    for r in rank_results[2]:
        assert r["unequal_batch"] == "every rank must have the same batch size, got [3, 4] (rank order)"


def _autotune_worker(rank, port, out_path):
    from clove_kernels.block_triton import agree_on_autotune

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        class Tuned:  # the two attributes of triton's Autotuner the agreement reads and writes
            configs = ["cfg_a", "cfg_b", "cfg_c"]
            cache = {("old", 1): "cfg_a"}

        kernel = Tuned()
        known = set(kernel.cache)
        # Each rank "timed" the configs and picked differently for the same two new keys.
        kernel.cache[("R", 4096)] = kernel.configs[2 if rank == 0 else 0]
        kernel.cache[("R", 8192)] = kernel.configs[1 if rank == 0 else 2]
        agree_on_autotune(kernel, known)
        torch.save(dict(kernel.cache), out_path)
    finally:
        dist.destroy_process_group()


def test_every_rank_runs_rank0s_autotune_choice(tmp_path):
    ctx = mp.get_context("spawn")
    port = _free_port()
    paths = [tmp_path / f"rank{r}.pt" for r in range(2)]
    procs = [ctx.Process(target=_autotune_worker, args=(r, port, str(paths[r]))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    caches = [torch.load(p) for p in paths]
    want = {("old", 1): "cfg_a", ("R", 4096): "cfg_c", ("R", 8192): "cfg_b"}
    assert caches[0] == want and caches[1] == want
