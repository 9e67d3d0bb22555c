"""The Triton block kernels (both directions from one row block) against the fp64 reference, incl. the split paths.

    pytest tests/test_kernels_block_triton.py

On CPU the kernels run in Triton's interpreter in a child process (TRITON_INTERPRET=1 must be set before triton is
imported; see tests/test_kernels_triton.py). The interpreter pretends the device has 4 SMs, so shapes with few row
blocks split their columns (forward and dQ) and shapes with few column blocks split their rows (dK): both paths run
here. The oracle is clove_kernels' materialised block reference in fp64, itself checked against autograd in
tests/test_kernels_block.py. The backward has two forms, both tested: the fused kernel (default; dK by atomic adds)
and the deterministic pair of dQ and dK kernels (`deterministic=True`).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import clove_kernels  # noqa: E402

ON_GPU = torch.cuda.is_available()
IN_INTERPRETER = not ON_GPU and os.environ.get("TRITON_INTERPRET") == "1"
RUN_HERE = ON_GPU or IN_INTERPRETER
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

delegated = pytest.mark.skipif(not RUN_HERE, reason="runs in the TRITON_INTERPRET=1 child process")


@pytest.mark.skipif(RUN_HERE, reason="the kernel tests run in this process")
def test_block_triton_suite_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", "not gpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    print("interpreter child:", summary)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary


def make_case(rows, cols, dim, num_stats, masked, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(cols, dim, generator=gen, dtype=torch.float64), dim=1)
    targets = torch.randperm(num_stats, generator=gen)[:rows]
    mask = None
    if masked:
        mask = torch.rand(cols, generator=gen) > 0.4
        mask[:num_stats] = True
        mask = mask.to(DEVICE)
    a = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.1
    b = torch.rand(num_stats, generator=gen, dtype=torch.float64) + 0.1
    c = -torch.rand(rows, generator=gen, dtype=torch.float64) - 0.1
    extra = torch.rand(num_stats, generator=gen, dtype=torch.float64) * 2
    return [t.to(DEVICE) for t in (q, k, targets)] + [mask] + [t.to(DEVICE) for t in (a, b, c, extra)]


# (rows, cols, D, stat columns): few row blocks (column split), few column blocks (row split), odd tails.
SHAPES = [(1, 1, 8, 1), (17, 257, 24, 17), (100, 128, 40, 100), (300, 320, 16, 300), (65, 200, 100, 130)]


@delegated
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("deterministic", [False, True], ids=["fused", "deterministic"])
def test_block_triton_fp32_matches_fp64_reference(shape, masked, deterministic):
    rows, cols, dim, num_stats = shape
    q, k, targets, mask, a, b, c, extra = make_case(rows, cols, dim, num_stats, masked, seed=sum(shape))
    scale = 14.3 if masked else 100.0
    s64 = torch.tensor(scale, dtype=torch.float64, device=DEVICE)
    want = clove_kernels.contrastive_block_forward(q, k, targets, s64, mask, num_stats, impl="reference")
    got = clove_kernels.contrastive_block_forward(q.float(), k.float(), targets, torch.tensor(scale, device=DEVICE),
                                                  mask, num_stats, impl="triton", allow_tf32=False)
    # fp32 dots of unit vectors times scale <= 100: a few fp32 ulps of 100 (~1e-5), LSE of up to 257 terms.
    for ours, theirs in zip(got, want):
        torch.testing.assert_close(ours.double(), theirs, rtol=2e-5, atol=5e-5)
    col_lse = want.col_lse + extra  # the combined column LSE of all ranks, handed back to the backward
    want_g = clove_kernels.contrastive_block_backward(q, k, targets, s64, want.row_lse, col_lse, a, b, c,
                                                      key_mask=mask, impl="reference")
    got_g = clove_kernels.contrastive_block_backward(q.float(), k.float(), targets,
                                                     torch.tensor(scale, device=DEVICE), got.row_lse,
                                                     col_lse.float(), a.float(), b.float(), c.float(),
                                                     key_mask=mask, impl="triton", allow_tf32=False,
                                                     deterministic=deterministic)
    torch_fp32 = clove_kernels.contrastive_block_backward(q.float(), k.float(), targets,
                                                          torch.tensor(scale, device=DEVICE), got.row_lse,
                                                          col_lse.float(), a.float(), b.float(), c.float(),
                                                          key_mask=mask, impl="chunked")
    # The fp32 yardstick: torch's own fp32 computation of the same gradients (chunked). Ours may be off by twice
    # its largest error plus 1e-6 x scale of the largest gradient: an fp32 logit of size `scale` is rounded by
    # ~6e-8 x scale, an error that exp carries into every probability and summation order places differently.
    for ours, yard, theirs in zip(got_g, torch_fp32, want_g):
        err = float((ours.double() - theirs).abs().max())
        bound = 2 * float((yard.double() - theirs).abs().max()) + 1e-6 * scale * float(theirs.abs().max())
        assert err <= bound, (err, bound)
    if mask is not None:
        assert float(got_g[1][~mask].abs().sum()) == 0.0  # masked columns get no gradient


@delegated
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("deterministic", [False, True], ids=["fused", "deterministic"])
def test_block_triton_low_precision(dtype, deterministic):
    """Same rounded inputs, fp64 oracle: statistics in fp32; gradients rounded once to the input dtype."""
    q, k, targets, mask, a, b, c, extra = make_case(40, 90, 32, 40, True, seed=7)
    q, k = q.to(dtype), k.to(dtype)
    s = torch.tensor(20.0, device=DEVICE)
    want = clove_kernels.contrastive_block_forward(q.double(), k.double(), targets, s.double(), mask, 40,
                                                   impl="reference")
    got = clove_kernels.contrastive_block_forward(q, k, targets, s, mask, 40, impl="triton")
    assert got.row_lse.dtype == torch.float32
    for ours, theirs in zip(got, want):
        torch.testing.assert_close(ours.double(), theirs, rtol=2e-5, atol=2e-5)  # fp32 statistics of exact products
    col_lse = want.col_lse + extra
    want_g = clove_kernels.contrastive_block_backward(q.double(), k.double(), targets, s.double(), want.row_lse,
                                                      col_lse, a, b, c, key_mask=mask, impl="reference")
    got_g = clove_kernels.contrastive_block_backward(q, k, targets, s, got.row_lse, col_lse.float(), a.float(),
                                                     b.float(), c.float(), key_mask=mask, impl="triton",
                                                     deterministic=deterministic)
    assert got_g[0].dtype == dtype and got_g[1].dtype == dtype
    # dS is rounded to the input dtype before the gradient dots (as flash-attention does) and the result once
    # more: two roundings of 2^-8 (bf16) / 2^-11 (fp16) relative on values of order 1.
    tol = {torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    for ours, theirs in zip(got_g[:2], want_g[:2]):
        torch.testing.assert_close(ours.double(), theirs, rtol=tol, atol=tol)
    torch.testing.assert_close(got_g[2].double(), want_g[2], rtol=tol, atol=tol)


@delegated
@pytest.mark.parametrize("deterministic", [False, True], ids=["fused", "deterministic"])
def test_contrastive_loss_triton_block_matches_plain_torch(deterministic, monkeypatch):
    from clove_dist.loss import ContrastiveLoss
    from clove_kernels import block_triton
    asked = []  # the loss's `deterministic` must reach the Triton backward (a spy: the real function still runs)
    real = block_triton.block_backward_triton
    monkeypatch.setattr(block_triton, "block_backward_triton",
                        lambda *args, **kwargs: asked.append(kwargs["deterministic"]) or real(*args, **kwargs))
    gen = torch.Generator().manual_seed(3)
    unit = lambda n: F.normalize(torch.randn(n, 24, generator=gen, dtype=torch.float64), dim=1)  # noqa: E731
    images, texts, negatives = unit(70), unit(70), unit(50)
    mask = torch.rand(50, generator=gen) > 0.3
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in (images, texts, negatives, logit_scale)]
        loss = fn(*leaves)
        loss.backward()
        return [loss.detach().double()] + [t.grad for t in leaves]

    ours = run(lambda i, t, n, s: ContrastiveLoss(impl="triton", allow_tf32=False, deterministic=deterministic)(
        i.float().to(DEVICE), t.float().to(DEVICE), s.float().to(DEVICE), n.float().to(DEVICE), mask.to(DEVICE)))
    assert asked == [deterministic]

    def plain(i, t, n, s):
        scale = s.exp()
        columns = torch.cat([t, n[mask]])
        labels = torch.arange(i.shape[0])
        return (F.cross_entropy(scale * i @ columns.T, labels) + F.cross_entropy(scale * t @ i.T, labels)) / 2

    theirs = run(plain)
    # fp32 kernels against fp64 plain torch at scale 14.3 over 190 columns: fp32 rounding, ~1e-6 relative.
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-4, atol=1e-5)


@delegated
def test_int64_offsets_and_noncontiguous():
    """A transposed view is accepted (copied once to unit D stride) and gives the contiguous result."""
    q, k, targets, mask, a, b, c, extra = make_case(20, 40, 16, 20, False, seed=11)
    q32, k32 = q.float(), k.float()
    kt = k32.T.contiguous().T  # stride (1, 40): not unit along D
    s = torch.tensor(10.0, device=DEVICE)
    one = clove_kernels.contrastive_block_forward(q32, k32, targets, s, None, 20, impl="triton", allow_tf32=False)
    two = clove_kernels.contrastive_block_forward(q32, kt, targets, s, None, 20, impl="triton", allow_tf32=False)
    for x, y in zip(one, two):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def backward_case(shape, masked, scale):
    """fp64 inputs and the fp64 statistics a backward takes, plus the fp32 copies the kernels get."""
    rows, cols, dim, num_stats = shape
    q, k, targets, mask, a, b, c, extra = make_case(rows, cols, dim, num_stats, masked, seed=sum(shape) + 1)
    s64 = torch.tensor(scale, dtype=torch.float64, device=DEVICE)
    stats = clove_kernels.contrastive_block_forward(q, k, targets, s64, mask, num_stats, impl="reference")
    fp64 = (q, k, targets, s64, mask, stats.row_lse, stats.col_lse + extra, a, b, c)
    fp32 = tuple(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in fp64)
    return fp64, fp32


def triton_backward(case, **kwargs):
    q, k, targets, s, mask, row_lse, col_lse, a, b, c = case
    return clove_kernels.block_backward(q, k, targets, s, mask, row_lse, col_lse, a, b, c, "triton",
                                        allow_tf32=False, **kwargs)


@delegated
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("need_q, need_k", [(True, False), (False, True)])
def test_block_triton_backward_partial_gradients(shape, need_q, need_k):
    """Asking for one gradient gives that gradient (the fused kernel only runs when dK is wanted; without it the
    dQ kernel runs alone) and dscale in both cases, against the fp64 oracle."""
    fp64, fp32 = backward_case(shape, masked=True, scale=30.0)
    want = clove_kernels.block_backward(*fp64, "reference")
    dq, dk, ds = triton_backward(fp32, need_q=need_q, need_k=need_k)
    assert (dq is None) == (not need_q) and (dk is None) == (not need_k)
    # fp32 against fp64 at scale 30: logits rounded by ~2e-6, carried by exp into every probability; 1e-5 of
    # the largest gradient leaves a 5x margin over the ~2e-6 errors the full-gradient test measures.
    for ours, theirs in ((dq, want[0]), (dk, want[1]), (ds, want[2])):
        if ours is not None:
            torch.testing.assert_close(ours.double(), theirs, rtol=0, atol=1e-5 * max(1.0, float(theirs.abs().max())))


def assert_fused_agrees_with_deterministic(fp64, fused, pair, ds_rounding, same_tiles):
    """|fused - deterministic| within what the two summation orders (and, unless same_tiles, two recomputations
    of S) allow, entry by entry.

    Both paths form dS with the same _dlogits and differ in the order their fp32 products are summed: dK by
    atomic adds over row blocks against per-split partials summed by torch. A sum of n fp32 terms is within
    (n - 1) u sum|terms| of the exact sum (u = 2^-24), so the two differ by at most 2 n u sum|terms|, plus u |value|
    each for the final multiplication by s. When each kernel may have tuned another BLOCK_D (on a GPU), each
    computes S with its own order over D: a logit moves by at most D u s (unit vectors), which exp carries into dS
    as a relative error, and the rounding of dS to the input dtype (ds_rounding: one ulp of it, 0 for fp32) may
    then land on neighbouring values. The whole is doubled for using fp64 dS in place of each path's own."""
    q, k, targets, s, mask, row_lse, col_lse, a, b, c = fp64
    logits = clove_kernels.block.block_logits_reference(q, k, s, mask)
    n = col_lse.shape[0]
    dlogits = a[:, None] * torch.exp(logits - row_lse[:, None])
    dlogits[:, :n] += b[None, :] * torch.exp(logits[:, :n] - col_lse[None, :])
    dlogits[torch.arange(q.shape[0], device=q.device), targets] += c
    u = 2.0 ** -24
    rows, cols, dim = q.shape[0], k.shape[0], q.shape[1]
    tiles = 0.0 if same_tiles else 2 * dim * u * float(s) + ds_rounding
    abs_terms = {  # sum_terms |term| per entry, and the number of terms summed
        "dq": (s * dlogits.abs() @ k.abs(), cols),
        "dk": (s * dlogits.abs().T @ q.abs(), rows),
        "ds": ((dlogits * (q @ k.T)).abs().sum(), rows * cols),
    }
    for (name, (terms, count)), one, two in zip(abs_terms.items(), fused, pair):
        bound = 2 * ((2 * count + 2) * u + tiles) * terms
        diff = (one.double() - two.double()).abs()
        assert bool((diff <= bound).all()), (name, float((diff - bound).max()))


@delegated
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("masked", [False, True])
def test_block_triton_fused_agrees_with_deterministic(shape, masked):
    """The fused backward against the deterministic pair of kernels, on fp32 inputs (bound: see the helper). In
    the interpreter every kernel has the one BLOCK_D of autotune_configs(), so both compute bitwise the same tiles
    of S and only the summation order of dK (and of nothing else) differs."""
    fp64, fp32 = backward_case(shape, masked, scale=50.0)
    fused = triton_backward(fp32, deterministic=False)
    pair = triton_backward(fp32, deterministic=True)
    assert_fused_agrees_with_deterministic(fp64, fused, pair, ds_rounding=0.0, same_tiles=IN_INTERPRETER)
    mask = fp64[4]
    if mask is not None:
        assert float(fused[1][~mask].abs().sum()) == 0.0  # atomics add nothing into masked columns


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_triton_gpu_fused_and_deterministic(dtype):
    """At a size where many row blocks add into each dK row at once: the deterministic backward is bitwise
    reproducible, the fused one agrees with it within the bound of the helper (its atomics may reorder sums)."""
    fp64, _ = backward_case((1000, 3001, 512, 1000), masked=True, scale=100.0)
    low = tuple(t.to(dtype) if i < 2 else (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                for i, t in enumerate(fp64))
    fp64 = tuple(t.to(dtype).double() if i < 2 else t for i, t in enumerate(fp64))  # the rounded inputs, exactly
    pair = triton_backward(low, deterministic=True)
    again = triton_backward(low, deterministic=True)
    for one, two in zip(pair, again):
        assert torch.equal(one, two)  # no atomics: bitwise identical
    fused = triton_backward(low, deterministic=False)
    # bf16: dS may round to a neighbouring bf16 value (one ulp, 2^-7 relative at most) and each gradient is
    # rounded once more on return (another ulp at most between the two paths).
    rounding = {torch.float32: 0.0, torch.bfloat16: 2 * 2.0 ** -7}[dtype]
    grads = lambda g: (g[0].double(), g[1].double(), g[2].double())  # noqa: E731
    assert_fused_agrees_with_deterministic(fp64, grads(fused), grads(pair), ds_rounding=rounding, same_tiles=False)
