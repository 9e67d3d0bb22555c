"""The block API (one row block, both directions): chunked and reference against a plain-torch autograd oracle.

    pytest tests/test_kernels_block.py

The oracle differentiates, with autograd in fp64,

    f = sum_i a_i row_lse_i + sum_j b_j exp(partial_col_lse_j - col_lse_j) + sum_i c_i S_{i, t_i}

whose gradient with respect to S is exactly what the backward takes as input: a_i softmax_row + b_j
exp(S_ij - col_lse_j) + c_i [j == t_i], with col_lse an external (combined) column LSE held constant.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import clove_kernels


def unit(num, dim, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num, dim, generator=gen, dtype=torch.float64), dim=1).to(dtype)


def make_case(rows, cols, dim, num_stats, masked, seed=0, positive=False):
    q, k = unit(rows, dim, seed), unit(cols, dim, seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    targets = torch.randperm(num_stats, generator=gen)[:rows]  # a one-to-one pairing into the stat columns
    mask = None
    if masked:
        mask = torch.rand(cols, generator=gen) > 0.4
        mask[:num_stats] = True  # stat columns are positive texts: always valid
    # The external column LSE is this block's partial one plus the mass of "other ranks' rows".
    extra = torch.rand(num_stats, generator=gen, dtype=torch.float64) * 3
    a = torch.rand(rows, generator=gen, dtype=torch.float64) - 0.2  # signs of both kinds on purpose
    b = torch.rand(num_stats, generator=gen, dtype=torch.float64) - 0.2
    c = torch.rand(rows, generator=gen, dtype=torch.float64) - 0.5
    if positive:  # what a loss with a positive upstream gradient hands in (the CPU path folds these into exp)
        a, b = a.abs() + 0.01, b.abs()
    return q, k, targets, mask, extra, a, b, c


def oracle(q, k, targets, scale, mask, num_stats, extra, a, b, c):
    q, k = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    logits = s * q @ k.T
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    row_lse = torch.logsumexp(logits, dim=1)
    partial = torch.logsumexp(logits[:, :num_stats], dim=0)
    col_lse = (partial + extra).detach()
    target = logits[torch.arange(q.shape[0]), targets]
    f = (a * row_lse).sum() + (b * torch.exp(partial - col_lse)).sum() + (c * target).sum()
    f.backward()
    return (row_lse.detach(), target.detach(), partial.detach(), col_lse), (q.grad, k.grad, s.grad)


SHAPES = [(1, 1, 3, 1), (5, 9, 4, 7), (17, 43, 16, 20), (31, 100, 24, 31)]  # rows, cols, D, stat columns


@pytest.mark.parametrize("impl", ["chunked", "reference"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("scale", [1.0, 14.3, 100.0])
@pytest.mark.parametrize("positive", [False, True])
def test_block_matches_autograd_oracle_fp64(impl, shape, masked, scale, positive):
    rows, cols, dim, num_stats = shape
    q, k, targets, mask, extra, a, b, c = make_case(rows, cols, dim, num_stats, masked, positive=positive)
    (row_lse, target, partial, col_lse), (dq, dk, ds) = oracle(q, k, targets, scale, mask, num_stats, extra, a, b, c)
    stats = clove_kernels.contrastive_block_forward(q, k, targets, torch.tensor(scale, dtype=torch.float64), mask,
                                                    num_stats, impl=impl, chunk_size=7)
    # fp64 throughout, tiles of 7 against whole rows: only summation order differs (~1e-15 relative).
    torch.testing.assert_close(stats.row_lse, row_lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.target_logit, target, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.col_lse, partial, rtol=1e-12, atol=1e-12)
    got = clove_kernels.contrastive_block_backward(q, k, targets, torch.tensor(scale, dtype=torch.float64),
                                                   stats.row_lse, col_lse, a, b, c, key_mask=mask, impl=impl,
                                                   chunk_size=7)
    for ours, theirs in zip(got, (dq, dk, ds)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-11)
    if mask is not None:
        assert float(got[1][~mask].abs().sum()) == 0.0  # masked columns get no gradient


def test_shared_exp_falls_back_when_terms_would_underflow():
    """One tile holding logits 200 apart (scale 100, opposite vectors): rows far below the tile max must still get
    their exact LSE (the one-exp fast path would lose them), against the fp64 oracle."""
    q = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=torch.float32)
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float32)
    targets = torch.tensor([0, 1, 2])
    s = torch.tensor(100.0)
    stats = clove_kernels.contrastive_block_forward(q, k, targets, s, None, 3, chunk_size=8)
    want = clove_kernels.contrastive_block_forward(q.double(), k.double(), targets, s.double(), None, 3,
                                                   impl="reference")
    # fp32 logits of size 100: a few ulps of 100.
    torch.testing.assert_close(stats.row_lse.double(), want.row_lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(stats.col_lse.double(), want.col_lse, rtol=1e-6, atol=1e-5)
    assert bool(torch.isfinite(stats.row_lse).all())


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 64])
@pytest.mark.parametrize("positive", [False, True])
def test_block_any_chunk_size(chunk_size, positive):
    q, k, targets, mask, extra, a, b, c = make_case(9, 21, 8, 9, True, seed=3, positive=positive)
    want = oracle(q, k, targets, 30.0, mask, 9, extra, a, b, c)
    s = torch.tensor(30.0, dtype=torch.float64)
    stats = clove_kernels.contrastive_block_forward(q, k, targets, s, mask, 9, chunk_size=chunk_size)
    got = clove_kernels.contrastive_block_backward(q, k, targets, s, stats.row_lse, want[0][3], a, b, c,
                                                   key_mask=mask, chunk_size=chunk_size)
    torch.testing.assert_close(stats.col_lse, want[0][2], rtol=1e-12, atol=1e-12)  # fp64: summation order only
    for ours, theirs in zip(got, want[1]):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_block_low_precision_inputs(dtype):
    """Statistics in fp32, gradients in the input dtype; against the fp64 oracle on the same rounded inputs."""
    q, k, targets, mask, extra, a, b, c = make_case(33, 70, 32, 33, True, seed=5)
    q, k = q.to(dtype), k.to(dtype)
    want = oracle(q.double(), k.double(), targets, 20.0, mask, 33, extra, a, b, c)
    s = torch.tensor(20.0)
    stats = clove_kernels.contrastive_block_forward(q, k, targets, s, mask, 33, chunk_size=16)
    assert stats.row_lse.dtype == torch.float32
    # fp32 statistics of logits up to 20 from 32-term dots: a few fp32 ulps of 20 (~1e-5).
    torch.testing.assert_close(stats.row_lse.double(), want[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.col_lse.double(), want[0][2], rtol=1e-5, atol=1e-5)
    dq, dk, ds = clove_kernels.contrastive_block_backward(q, k, targets, s, stats.row_lse, want[0][3].float(),
                                                          a.float(), b.float(), c.float(), key_mask=mask,
                                                          chunk_size=16)
    assert dq.dtype == dtype and dk.dtype == dtype
    # Computed in fp32, then rounded once to the input dtype: its half-ulp (bf16 2^-8, fp16 2^-11) relative,
    # plus fp32 accumulation noise for fp32.
    tol = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(dq.double(), want[1][0], rtol=tol, atol=tol)
    torch.testing.assert_close(dk.double(), want[1][1], rtol=tol, atol=tol)
    torch.testing.assert_close(ds.double(), want[1][2], rtol=1e-4, atol=1e-4)


def test_block_bad_inputs_raise_value_error():
    q, k, targets, mask, *_ = make_case(4, 8, 4, 4, True)
    bad = mask.clone()
    unpaired = [j for j in range(6) if j not in targets.tolist()][0]
    bad[unpaired] = False
    with pytest.raises(ValueError, match="num_col_stats=6 columns carry column statistics and must be valid"):
        clove_kernels.contrastive_block_forward(q, k, targets, 1.0, bad, 6)
    with pytest.raises(ValueError, match="num_col_stats must be an integer in"):
        clove_kernels.contrastive_block_forward(q, k, targets, 1.0, mask, 9)
    with pytest.raises(ValueError, match="grad_row_lse must have shape"):
        clove_kernels.contrastive_block_backward(q, k, targets, 1.0, torch.zeros(4), torch.zeros(4), torch.zeros(3),
                                                 torch.zeros(4), torch.zeros(4), key_mask=mask)
    with pytest.raises(ValueError, match="block impl must be one of"):
        clove_kernels.contrastive_block_forward(q, k, targets, 1.0, mask, 4, impl="bogus")
