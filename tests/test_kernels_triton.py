"""The fused Triton contrastive CE against the materialised reference, forward and every gradient.

    pytest tests/test_kernels_triton.py

Without CUDA the kernels run in Triton's CPU interpreter, which needs TRITON_INTERPRET=1 before triton is first
imported (triton.language's own helpers are compiled then) and while kernels run. Other test modules may import
triton earlier (DeepSpeed does), and the variable must not leak into their processes, so on CPU the one test
`test_triton_suite_in_interpreter` re-runs this file in a fresh interpreter process with the variable set, where
the kernel tests below run; in the parent process they are skipped as delegated. On CUDA they run directly.
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

import clove_kernels  # noqa: E402  (does not import triton)

ON_GPU = torch.cuda.is_available()
IN_INTERPRETER = not ON_GPU and os.environ.get("TRITON_INTERPRET") == "1"
RUN_HERE = ON_GPU or IN_INTERPRETER
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
SHAPES = [(r, m, d) for r in (1, 17, 100) for m in (1, 33, 257) for d in (8, 100)]
SCALES = (1.0, 14.3, 100.0)

delegated = pytest.mark.skipif(not RUN_HERE, reason="runs in the TRITON_INTERPRET=1 child process "
                                                    "(test_triton_suite_in_interpreter)")


@pytest.mark.skipif(RUN_HERE, reason="the kernel tests run in this process")
def test_triton_suite_in_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", "not gpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    print("interpreter child:", summary)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary


def make_inputs(num_rows, num_cols, dim, *, masked=False, seed=0):
    """fp64 L2-normalised queries/keys on DEVICE, targets, optional mask, upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(num_rows, dim, generator=gen, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(num_cols, dim, generator=gen, dtype=torch.float64), dim=1)
    targets = torch.randint(0, num_cols, (num_rows,), generator=gen)
    mask = None
    if masked:
        mask = torch.rand(num_cols, generator=gen) > 0.4
        mask[targets] = True
        mask = mask.to(DEVICE)
    grad_out = torch.rand(num_rows, generator=gen, dtype=torch.float64) + 0.5
    return q.to(DEVICE), k.to(DEVICE), targets.to(DEVICE), mask, grad_out.to(DEVICE)


def loss_and_grads(impl, q, k, targets, scale, mask, grad_out):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    s = torch.tensor(scale, dtype=torch.float32 if q.dtype != torch.float64 else torch.float64,
                     device=DEVICE, requires_grad=True)
    loss = clove_kernels.contrastive_ce(q, k, targets, s, key_mask=mask, impl=impl)
    (loss * grad_out.to(loss.dtype)).sum().backward()
    return loss.detach(), q.grad, k.grad, s.grad


@delegated
def test_triton_is_selected():
    assert clove_kernels.resolve_impl("triton", DEVICE) == "triton"


# The interpreter runs about 1 s per 100 x 257 x 100 case, so each (shape, mask) case takes one of the three
# scales in turn instead of all three: every scale still meets every R, M and D.
CASES = [(shape, masked, SCALES[(i + int(masked)) % len(SCALES)])
         for i, shape in enumerate(SHAPES) for masked in (False, True)]


@delegated
@pytest.mark.parametrize("shape, masked, scale", CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else str(v))
def test_triton_fp32_matches_fp64_reference(shape, masked, scale):
    q, k, targets, mask, grad_out = make_inputs(*shape, masked=masked, seed=sum(shape))
    ours = loss_and_grads("triton", q.float(), k.float(), targets, scale, mask, grad_out)
    ref = loss_and_grads("reference", q, k, targets, scale, mask, grad_out)
    # fp32 (eps 1.2e-7) logits of magnitude <= scale, summed over D <= 100 products: absolute logit error of order
    # D * eps * scale ~ 1e-5 * scale, the same relative error in each softmax weight; dq/dk are scale * (weights @
    # unit vectors). atol 2e-5 * scale covers it (the chunked fp32 path measures 1.3e-4 at scale 100).
    atol = 2e-5 * scale
    for name, a, b in zip(("loss", "dq", "dk", "dscale"), ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


def torch_lowp(q, k, targets, scale, mask, grad_out):
    """Plain torch with everything in the inputs' low precision: the yardstick of the STYLE.md rule."""
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    s = torch.tensor(scale, device=DEVICE, requires_grad=True)
    logits = s.to(q.dtype) * (q @ k.T)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    loss = torch.logsumexp(logits, dim=1) - logits.gather(1, targets[:, None]).squeeze(1)
    (loss.float() * grad_out.float()).sum().backward()
    return loss.detach(), q.grad, k.grad, s.grad


@delegated
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_triton_low_precision_rule(dtype, masked):
    q, k, targets, mask, grad_out = make_inputs(100, 257, 100, masked=masked, seed=11)
    q_low, k_low, g32 = q.float().to(dtype), k.float().to(dtype), grad_out.float()
    # As in flash-attention's tests: the fp32 reference sees the same low-precision inputs, upcast, so only the
    # arithmetic is compared, not the rounding of the inputs that every implementation shares.
    ref = loss_and_grads("reference", q_low.float(), k_low.float(), targets, 14.3, mask, g32)
    ours = loss_and_grads("triton", q_low, k_low, targets, 14.3, mask, g32)
    low = torch_lowp(q_low, k_low, targets, 14.3, mask, g32)
    # STYLE.md rule on max errors: max|ours - fp32_ref| <= 2 * max|torch_lowp - fp32_ref| + atol, with atol a few
    # fp32 ulps of values of order 10 (what remains when torch's own error is tiny).
    atol = 1e-5
    for name, a, b, c in zip(("loss", "dq", "dk", "dscale"), ours, ref, low):
        err_ours = float((a.float() - b.float()).abs().max())
        err_torch = float((c.float() - b.float()).abs().max())
        assert err_ours <= 2 * err_torch + atol, f"{name}: ours max err {err_ours:.3g} vs torch {dtype} {err_torch:.3g}"


@delegated
def test_triton_non_contiguous_inputs():
    q, k, targets, mask, grad_out = make_inputs(17, 33, 100, masked=True, seed=5)
    q_wide = torch.stack([q, torch.zeros_like(q)], dim=2).flatten(1).float().requires_grad_(True)  # (R, 2D)
    k_t = k.T.contiguous().float().requires_grad_(True)  # (D, M)
    q_nc, k_nc = q_wide[:, ::2], k_t.T  # stride 2 along D; column-major keys
    assert not q_nc.is_contiguous() and not k_nc.is_contiguous()
    s = torch.tensor(14.3, device=DEVICE, requires_grad=True)
    loss = clove_kernels.contrastive_ce(q_nc, k_nc, targets, s, key_mask=mask, impl="triton")
    (loss * grad_out.float()).sum().backward()
    ours = (loss.detach(), q_wide.grad[:, ::2], k_t.grad.T, s.grad)
    ref = loss_and_grads("reference", q, k, targets, 14.3, mask, grad_out)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=3e-4)  # fp32 rounding at scale 14.3, as above
    assert float(q_wide.grad[:, 1::2].abs().max()) == 0.0


@delegated
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["identical", "opposite"])
def test_triton_extreme_inputs_are_finite(dtype, case):
    num_rows, num_cols, dim = 17, 33, 8
    v = F.normalize(torch.ones(dim, dtype=torch.float64), dim=0).to(DEVICE)
    q = v.expand(num_rows, dim)
    k = v.expand(num_cols, dim).clone()
    targets = torch.arange(num_rows, device=DEVICE) % num_cols
    if case == "opposite":
        k[targets] = -v
    ours = loss_and_grads("triton", q.to(dtype), k.to(dtype), targets, 100.0, None,
                          torch.ones(num_rows, dtype=torch.float64, device=DEVICE))
    for t in ours:
        assert torch.isfinite(t).all()
    if case == "identical":
        # every logit equals the scale up to rounding of q.k (bf16 rounding of a unit vector: ~4e-3 * 100)
        torch.testing.assert_close(ours[0], torch.full_like(ours[0], math.log(num_cols)),
                                   rtol=0, atol=1e-4 if dtype == torch.float32 else 1.0)
    else:
        assert float(ours[0].min()) > 190.0


@delegated
def test_triton_fp64_inputs_and_frozen_keys():
    # fp64 runs in fp32 (documented); keys without grad skip the dK kernel but dq and dscale stay exact.
    q, k, targets, mask, grad_out = make_inputs(17, 33, 8, masked=True, seed=9)
    qg = q.clone().requires_grad_(True)
    s = torch.tensor(14.3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    loss = clove_kernels.contrastive_ce(qg, k, targets, s, key_mask=mask, impl="triton")
    assert loss.dtype == torch.float64
    dq, ds = torch.autograd.grad((loss * grad_out).sum(), [qg, s])
    ref = loss_and_grads("reference", q, k, targets, 14.3, mask, grad_out)
    torch.testing.assert_close(loss, ref[0], rtol=1e-4, atol=1e-4)  # fp32 rounding at scale 14.3
    torch.testing.assert_close(dq, ref[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ds, ref[3], rtol=1e-4, atol=1e-4)


@delegated
def test_triton_backward_is_deterministic():
    q, k, targets, mask, grad_out = make_inputs(100, 257, 8, masked=True, seed=4)
    first = loss_and_grads("triton", q.float(), k.float(), targets, 14.3, mask, grad_out)
    second = loss_and_grads("triton", q.float(), k.float(), targets, 14.3, mask, grad_out)
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # no atomics: bitwise identical


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1000, 3001, 512), (4096, 8191, 768)], ids=lambda s: "x".join(map(str, s)))
def test_triton_gpu_full_size(shape, dtype):
    q, k, targets, mask, grad_out = make_inputs(*shape, masked=True, seed=13)
    ref = loss_and_grads("reference", q.float(), k.float(), targets, 14.3, mask, grad_out.float())
    ours = loss_and_grads("triton", q.float().to(dtype), k.float().to(dtype), targets, 14.3, mask, grad_out)
    if dtype == torch.float32:
        for a, b in zip(ours, ref):
            # IEEE fp32 dots: rounding over D <= 768 and M <= 8191 columns at scale 14.3, relative.
            torch.testing.assert_close(a.float(), b, rtol=1e-3, atol=1e-3)
    else:
        q_low, k_low = q.float().to(dtype), k.float().to(dtype)
        ref = loss_and_grads("reference", q_low.float(), k_low.float(), targets, 14.3, mask, grad_out.float())
        low = torch_lowp(q_low, k_low, targets, 14.3, mask, grad_out.float())
        for name, a, b, c in zip(("loss", "dq", "dk", "dscale"), ours, ref, low):
            err_ours = float((a.float() - b).abs().max())
            err_torch = float((c.float() - b).abs().max())
            # STYLE.md rule on max errors; atol a few fp32 ulps of values of order 10.
            assert err_ours <= 2 * err_torch + 1e-5, f"{name}: {err_ours} vs {err_torch}"
