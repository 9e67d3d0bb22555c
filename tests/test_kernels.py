"""clove_kernels.contrastive_ce: the reference oracle, the chunked torch implementation, dispatch and validation.

    pytest tests/test_kernels.py

The Triton implementation is tested in tests/test_kernels_triton.py (interpreter on CPU).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import clove_kernels
from clove_kernels.reference import contrastive_ce_reference

SHAPES = [(r, m, d) for r in (1, 17, 100) for m in (1, 33, 257) for d in (8, 100)]
SCALES = (1.0, 14.3, 100.0)


def make_inputs(num_rows: int, num_cols: int, dim: int, *, dtype=torch.float64, masked: bool = False,
                seed: int = 0):
    """L2-normalised queries/keys (like CLIP features), targets, an optional mask and an upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(num_rows, dim, generator=gen, dtype=torch.float64), dim=1).to(dtype)
    k = F.normalize(torch.randn(num_cols, dim, generator=gen, dtype=torch.float64), dim=1).to(dtype)
    targets = torch.randint(0, num_cols, (num_rows,), generator=gen)
    mask = None
    if masked:
        mask = torch.rand(num_cols, generator=gen) > 0.4
        mask[targets] = True
    grad_out = torch.rand(num_rows, generator=gen, dtype=torch.float64) + 0.5
    return q, k, targets, mask, grad_out


def loss_and_grads(impl: str, q, k, targets, scale: float, mask, grad_out, *, scale_dtype=torch.float64,
                   **kwargs):
    """Per-row loss and the gradients of sum(loss * grad_out) w.r.t. queries, keys and scale."""
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    s = torch.tensor(scale, dtype=scale_dtype, requires_grad=True)
    loss = clove_kernels.contrastive_ce(q, k, targets, s, key_mask=mask, impl=impl, **kwargs)
    (loss * grad_out.to(loss.dtype)).sum().backward()
    return loss.detach(), q.grad, k.grad, s.grad


def test_reference_matches_logsumexp_formula():
    # The oracle (F.cross_entropy on masked logits) against the defining formula written independently.
    q, k, targets, mask, _ = make_inputs(17, 33, 8, masked=True)
    scale = torch.tensor(14.3, dtype=torch.float64)
    logits = scale * (q @ k.T)
    valid = logits.masked_fill(~mask, float("-inf"))
    expected = torch.logsumexp(valid, dim=1) - logits[torch.arange(17), targets]
    got = contrastive_ce_reference(q, k, targets, scale, mask)
    # fp64, same operations in a different order: only rounding differences of about 1e-16 relative.
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_chunked_matches_reference_fp64(shape, masked, scale):
    q, k, targets, mask, grad_out = make_inputs(*shape, masked=masked, seed=sum(shape))
    # chunk_size 16 splits every dimension above into several tiles with a ragged last one.
    ours = loss_and_grads("chunked", q, k, targets, scale, mask, grad_out, chunk_size=16)
    ref = loss_and_grads("reference", q, k, targets, scale, mask, grad_out)
    for name, a, b in zip(("loss", "dq", "dk", "dscale"), ours, ref):
        # fp64 with logits |x| <= 100 summed over <= 257 columns: rounding is ~1e-13; 1e-10 leaves margin while a
        # wrong term (any missing or extra column contributes >= exp(-200) only in contrived cases) is far above.
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("chunk_size", [1, 7, 32, 4096])
def test_chunked_any_chunk_size(chunk_size):
    q, k, targets, mask, grad_out = make_inputs(17, 33, 8, masked=True, seed=3)
    ours = loss_and_grads("chunked", q, k, targets, 14.3, mask, grad_out, chunk_size=chunk_size)
    ref = loss_and_grads("reference", q, k, targets, 14.3, mask, grad_out)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)  # fp64 rounding only, as above


@pytest.mark.parametrize("shape", [(17, 33, 8), (100, 257, 100)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scale", SCALES)
def test_chunked_fp32_against_fp64_reference(shape, scale):
    q, k, targets, mask, grad_out = make_inputs(*shape, masked=True, seed=7)
    ours = loss_and_grads("chunked", q.float(), k.float(), targets, scale, mask, grad_out,
                          scale_dtype=torch.float32, chunk_size=16)
    ref = loss_and_grads("reference", q, k, targets, scale, mask, grad_out)
    # fp32 eps is 1.2e-7; logits reach |100| and the loss sums exp over <= 257 columns, so absolute errors of a
    # few 1e-5 are rounding. dscale sums |dlogit * qk| over all R*M entries (up to ~R), hence the larger atol.
    tolerances = {"loss": 1e-4, "dq": 1e-4, "dk": 1e-4, "dscale": 1e-3}
    for (name, atol), a, b in zip(tolerances.items(), ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")


def torch_lowp_loss(q, k, targets, scale, mask):
    """What plain torch computes when everything stays in the input's low precision."""
    logits = scale.to(q.dtype) * (q @ k.T)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(logits, dim=1) - logits.gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_low_precision_rule(dtype, masked):
    q64, k64, targets, mask, grad_out = make_inputs(100, 257, 100, masked=masked, seed=11)
    scale, g32 = 14.3, grad_out.float()
    q_low, k_low = q64.float().to(dtype), k64.float().to(dtype)
    # As in flash-attention's tests: the fp32 reference sees the same low-precision inputs, upcast, so only the
    # arithmetic is compared, not the rounding of the inputs that every implementation shares.
    ref = loss_and_grads("reference", q_low.float(), k_low.float(), targets, scale, mask, g32,
                         scale_dtype=torch.float32)
    ours = loss_and_grads("chunked", q_low, k_low, targets, scale, mask, g32, scale_dtype=torch.float32,
                          chunk_size=16)
    qs, ks = q_low.clone().requires_grad_(True), k_low.clone().requires_grad_(True)
    s_low = torch.tensor(scale, requires_grad=True)
    lowp = torch_lowp_loss(qs, ks, targets, s_low, mask)
    (lowp.float() * g32).sum().backward()
    lowp_all = (lowp.detach(), qs.grad, ks.grad, s_low.grad)
    # STYLE.md rule on max errors: max|ours - fp32_ref| <= 2 * max|torch_lowp - fp32_ref| + atol, with atol a few
    # fp32 ulps of values of order 10 (what remains when torch's own error is tiny).
    atol = 1e-5
    for name, a, b, c in zip(("loss", "dq", "dk", "dscale"), ours, ref, lowp_all):
        err_ours = float((a.float() - b.float()).abs().max())
        err_torch = float((c.float() - b.float()).abs().max())
        assert err_ours <= 2 * err_torch + atol, f"{name}: ours max err {err_ours:.3g} vs torch {dtype} {err_torch:.3g}"


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["identical", "opposite"])
def test_extreme_inputs_are_finite(impl, dtype, case):
    # Identical features: every logit equals the scale (100), so the loss is exactly log(M).
    # Opposite features: the target logit is -100 while others are +100, a loss of about 200.
    num_rows, num_cols, dim = 17, 33, 8
    v = F.normalize(torch.ones(dim), dim=0)
    q = v.expand(num_rows, dim).to(dtype)
    k = v.expand(num_cols, dim).clone()
    targets = torch.arange(num_rows) % num_cols
    if case == "opposite":
        k[targets] = -v
    k = k.to(dtype)
    loss, dq, dk, ds = loss_and_grads(impl, q, k, targets, 100.0, None, torch.ones(num_rows, dtype=torch.float64),
                                      scale_dtype=torch.float32)
    for t in (loss, dq, dk, ds):
        assert torch.isfinite(t).all()
    if case == "identical":
        # all logits equal up to rounding of q.k in the input dtype (bf16 rounding of a unit vector: ~4e-3)
        torch.testing.assert_close(loss, torch.full_like(loss, math.log(num_cols)),
                                   rtol=0, atol=1e-4 if dtype == torch.float32 else 1.0)
    else:
        assert float(loss.min()) > 190.0


def test_chunked_non_contiguous_inputs():
    q, k, targets, mask, grad_out = make_inputs(17, 33, 100, masked=True, seed=5)
    # Leaves with padding, so the views the kernel sees are strided: q every other element along D, k column-major.
    q_wide = torch.stack([q, torch.zeros_like(q)], dim=2).flatten(1).requires_grad_(True)  # (R, 2D)
    k_t = k.T.contiguous().requires_grad_(True)  # (D, M)
    q_nc, k_nc = q_wide[:, ::2], k_t.T
    assert not q_nc.is_contiguous() and not k_nc.is_contiguous()
    s = torch.tensor(14.3, dtype=torch.float64, requires_grad=True)
    loss = clove_kernels.contrastive_ce(q_nc, k_nc, targets, s, key_mask=mask, impl="chunked", chunk_size=16)
    (loss * grad_out).sum().backward()
    ours = (loss.detach(), q_wide.grad[:, ::2], k_t.grad.T, s.grad)
    ref = loss_and_grads("reference", q, k, targets, 14.3, mask, grad_out)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)  # fp64 rounding only
    assert float(q_wide.grad[:, 1::2].abs().max()) == 0.0  # the padding was never read


def test_empty_rows_and_float_scale():
    q, k, _, _, _ = make_inputs(3, 5, 8)
    empty = clove_kernels.contrastive_ce(q[:0], k, torch.zeros(0, dtype=torch.long), 2.0, impl="chunked")
    assert empty.shape == (0,)
    targets = torch.tensor([0, 4, 2])
    a = clove_kernels.contrastive_ce(q, k, targets, 2.0, impl="chunked")  # python float scale is accepted
    b = clove_kernels.contrastive_ce(q, k, targets, torch.tensor([2.0]), impl="reference")  # and shape [1]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # fp64 rounding only


def test_scale_without_grad_and_frozen_keys():
    q, k, targets, mask, grad_out = make_inputs(17, 33, 8, masked=True)
    q = q.clone().requires_grad_(True)
    loss = clove_kernels.contrastive_ce(q, k, targets, torch.tensor(3.0, dtype=torch.float64), key_mask=mask,
                                        impl="chunked", chunk_size=8)
    (dq,) = torch.autograd.grad((loss * grad_out).sum(), [q])
    _, ref_dq, _, _ = loss_and_grads("reference", q, k, targets, 3.0, mask, grad_out)
    torch.testing.assert_close(dq, ref_dq, rtol=1e-10, atol=1e-10)  # fp64 rounding only


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_gradcheck(impl):
    # Finite differences in fp64: an independent check of the analytic backward, including the scale.
    q, k, targets, mask, _ = make_inputs(5, 7, 3, masked=True, seed=2)
    q.requires_grad_(True)
    k.requires_grad_(True)
    s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    fn = lambda q_, k_, s_: clove_kernels.contrastive_ce(q_, k_, targets, s_, key_mask=mask, impl=impl,  # noqa
                                                         chunk_size=2)
    assert torch.autograd.gradcheck(fn, (q, k, s))


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=torch.zeros(4, 7)), "feature dimension mismatch"),
    (dict(targets=torch.tensor([0, 1, 4])), r"targets must lie in \[0, 4\), got values from 0 to 4"),
    (dict(targets=torch.tensor([0, -1, 2])), "got values from -1 to 2"),
    (dict(targets=torch.tensor([0, 1])), "targets must be a 1-d tensor of length R=3"),
    (dict(targets=torch.tensor([0.0, 1.0, 2.0])), "targets must be int64"),
    (dict(mask=torch.tensor([True, False, True, True])), "target column 1 of row 1 is masked out"),
    (dict(mask=torch.tensor([True, True, True])), "key_mask has 3 entries but there are M=4 keys"),
    (dict(mask=torch.ones(4)), "key_mask must be a 1-d bool tensor"),
    (dict(q=torch.zeros(3, 8, dtype=torch.float64)), "queries and keys must share a dtype"),
    (dict(q=torch.zeros(3, 8, dtype=torch.int64)), "must be floating point"),
    (dict(q=torch.zeros(8)), r"queries must be \[R, D\]"),
    (dict(scale=torch.ones(2)), "scale must be a 0-dim tensor"),
    (dict(impl="fast"), "impl must be one of auto, triton, chunked, reference, got 'fast'"),
    (dict(chunk_size=0), "chunk_size must be a positive integer, got 0"),
])
def test_bad_inputs_raise_value_error(kwargs, message):
    args = dict(q=torch.zeros(3, 8), k=torch.zeros(4, 8), targets=torch.tensor([0, 1, 2]), scale=torch.tensor(1.0),
                mask=None, impl="chunked", chunk_size=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        clove_kernels.contrastive_ce(args["q"], args["k"], args["targets"], args["scale"], key_mask=args["mask"],
                                     impl=args["impl"], chunk_size=args["chunk_size"])


def test_auto_on_cpu_is_chunked_and_silent(recwarn):
    assert clove_kernels.resolve_impl("auto", torch.device("cpu")) == "chunked"
    assert not [w for w in recwarn if "Triton" in str(w.message)]


def test_triton_fallback_announces_once():
    # A fresh interpreter without TRITON_INTERPRET: the real import path decides, and the warning must appear
    # exactly once over two calls while the result is the chunked one.
    code = textwrap.dedent("""
        import warnings, torch, clove_kernels
        q = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
        t = torch.tensor([0, 1, 2, 3, 4])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = clove_kernels.contrastive_ce(q, q, t, torch.tensor(3.0), impl="triton")
            b = clove_kernels.contrastive_ce(q, q, t, torch.tensor(3.0), impl="triton")
        c = clove_kernels.contrastive_ce(q, q, t, torch.tensor(3.0), impl="chunked")
        hits = [str(w.message) for w in caught if "Triton" in str(w.message)]
        print(len(hits), torch.equal(a, c) and torch.equal(b, c), hits[0] if hits else "")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # a GPU machine must also take the CPU path here
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    count, same, message = out.stdout.strip().split(" ", 2)
    assert count == "1" and same == "True", out.stdout
    assert "using the chunked torch loss" in message


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_on_gpu(dtype):
    q, k, targets, mask, grad_out = make_inputs(1000, 3001, 512, masked=True, seed=13)
    dev = torch.device("cuda")
    args = [t.to(dev) for t in (q, k, targets, mask, grad_out)]
    ref = loss_and_grads("reference", *args[:3], 14.3, args[3], args[4])
    ours = loss_and_grads("chunked", args[0].to(dtype), args[1].to(dtype), args[2], 14.3, args[3], args[4],
                          scale_dtype=torch.float32, chunk_size=512)
    if dtype == torch.float32:
        for a, b in zip(ours, ref):
            # fp32 rounding of logits <= 14.3 over D = 512 and 3001 columns, relative.
            torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3)
        return
    q_low, k_low = args[0].float().to(dtype), args[1].float().to(dtype)
    ref = loss_and_grads("reference", q_low.float(), k_low.float(), args[2], 14.3, args[3], args[4].float(),
                         scale_dtype=torch.float32)
    qs, ks = q_low.clone().requires_grad_(True), k_low.clone().requires_grad_(True)
    s_low = torch.tensor(14.3, device=dev, requires_grad=True)
    lowp = torch_lowp_loss(qs, ks, args[2], s_low, args[3])
    (lowp.float() * args[4].float()).sum().backward()
    for name, a, b, c in zip(("loss", "dq", "dk", "dscale"), ours, ref, (lowp.detach(), qs.grad, ks.grad, s_low.grad)):
        err_ours = float((a.float() - b.float()).abs().max())
        err_torch = float((c.float() - b.float()).abs().max())
        assert err_ours <= 2 * err_torch + 1e-5, f"{name}: {err_ours} vs {err_torch}"  # STYLE.md rule, max errors
