"""ContrastiveLoss on one process: against open_clip's ClipLoss and an independent plain-torch CLoVe loss.

    pytest tests/test_loss.py
"""
from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clove_dist.config import LossConfig
from clove_dist.loss import ContrastiveLoss

IMPLS = ["reference", "chunked"]


def clip_loss_reference(images, texts, logit_scale, negatives=None, negative_mask=None, max_scale=100.0):
    """The CLoVe loss written out with logits and F.cross_entropy: negatives are extra text columns (only the
    valid ones), never rows."""
    scale = logit_scale.reshape(()).exp().clamp(max=max_scale)
    columns = texts
    if negatives is not None:
        valid = negatives if negative_mask is None else negatives[negative_mask]
        columns = torch.cat([texts, valid])
    labels = torch.arange(images.shape[0])
    i2t = F.cross_entropy(scale * images @ columns.T, labels)
    t2i = F.cross_entropy(scale * texts @ images.T, labels)
    return (i2t + t2i) / 2


def features(num, dim, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num, dim, generator=gen, dtype=torch.float64), dim=1).to(dtype)


def run(fn, *tensors):
    """Loss and the gradient of every tensor argument (None stays None)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(t.dtype.is_floating_point)
              for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [None if t is None or t.grad is None else t.grad for t in leaves]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("logit_scale_shape", [(), (1,)])
def test_equals_open_clip_without_negatives(impl, logit_scale_shape):
    images, texts = features(17, 32, 0, torch.float32), features(17, 32, 1, torch.float32)
    logit_scale = torch.full(logit_scale_shape, math.log(1 / 0.07))  # open_clip's initial value
    ours, ours_grads = run(lambda i, t, s: ContrastiveLoss(impl=impl, chunk_size=8)(i, t, s),
                           images, texts, logit_scale)
    theirs, their_grads = run(lambda i, t, s: open_clip.loss.ClipLoss()(i, t, s.exp()), images, texts,
                              logit_scale)
    # Both fp32 over 17 columns at scale 14.3: rounding differences of a few fp32 ulps of values of order 1-10.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(ours_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert ours_grads[2].shape == logit_scale.shape


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch, num_neg, dim", [(1, 0, 8), (1, 3, 8), (17, 5, 33), (100, 257, 100)])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_plain_torch_with_negatives(impl, batch, num_neg, dim, masked):
    images, texts = features(batch, dim, 2), features(batch, dim, 3)
    negatives = features(num_neg, dim, 4)
    mask = None
    if masked and num_neg:
        mask = torch.rand(num_neg, generator=torch.Generator().manual_seed(5)) > 0.5
    logit_scale = torch.tensor(math.log(30.0), dtype=torch.float64)
    loss_fn = ContrastiveLoss(impl=impl, chunk_size=16)
    ours, ours_grads = run(lambda i, t, s, n: loss_fn(i, t, s, n, mask), images, texts, logit_scale, negatives)
    ref, ref_grads = run(lambda i, t, s, n: clip_loss_reference(i, t, s, n, mask), images, texts, logit_scale,
                         negatives)
    assert ours.dtype == torch.float32  # the training loss is reported in fp32 whatever the feature dtype
    # ours is rounded to fp32 at the end (relative 6e-8); the gradients stay fp64: rounding only, 1e-10.
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    for name, a, b in zip(("images", "texts", "logit_scale", "negatives"), ours_grads, ref_grads):
        if name == "negatives" and num_neg == 0:
            continue  # an empty tensor that takes no part in the loss has no gradient to compare
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")
    if mask is not None and not bool(mask.all()):
        assert float(ours_grads[3][~mask].abs().max()) == 0.0  # masked negatives get no gradient


def test_masked_negatives_add_no_exp_zero_term():
    # Padding negatives with zero vectors but masking them must equal having no such columns at all; unmasked
    # zero vectors would add exp(0) terms and change the loss.
    images, texts, negatives = features(9, 16, 6), features(9, 16, 7), features(4, 16, 8)
    padded = torch.cat([negatives, torch.zeros(3, 16, dtype=torch.float64)])
    mask = torch.tensor([True] * 4 + [False] * 3)
    logit_scale = torch.tensor(2.0, dtype=torch.float64)
    loss_fn = ContrastiveLoss(impl="chunked")
    with_mask = loss_fn(images, texts, logit_scale, padded, mask)
    only_valid = loss_fn(images, texts, logit_scale, negatives)
    unmasked = loss_fn(images, texts, logit_scale, padded)
    assert float(with_mask) == pytest.approx(float(only_valid), abs=1e-6)  # fp32 result, same fp64 math
    assert abs(float(unmasked) - float(only_valid)) > 1e-3


def test_empty_negatives_equal_none():
    images, texts = features(5, 8, 9), features(5, 8, 10)
    logit_scale = torch.tensor(1.5, dtype=torch.float64)
    loss_fn = ContrastiveLoss(impl="chunked")
    a = loss_fn(images, texts, logit_scale, torch.zeros(0, 8, dtype=torch.float64))
    b = loss_fn(images, texts, logit_scale, None)
    assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_scale_is_clamped_inside_forward(impl):
    images, texts, negatives = features(7, 8, 11), features(7, 8, 12), features(3, 8, 13)
    loss_fn = ContrastiveLoss(impl=impl, max_logit_scale=50.0)
    above, grads = run(lambda i, t, s, n: loss_fn(i, t, s, n), images, texts,
                       torch.tensor([math.log(200.0)], dtype=torch.float64), negatives)
    at_max = clip_loss_reference(images, texts, torch.tensor(math.log(50.0), dtype=torch.float64), negatives)
    torch.testing.assert_close(above.double(), at_max, rtol=1e-6, atol=1e-6)  # fp32 rounding of the result
    assert float(grads[2].abs().max()) == 0.0  # a clamped scale receives no gradient


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_features(dtype):
    images, texts, negatives = features(33, 64, 14), features(33, 64, 15), features(20, 64, 16)
    logit_scale = torch.tensor(math.log(1 / 0.07))
    ours, grads = run(lambda i, t, s, n: ContrastiveLoss(impl="chunked")(i, t, s, n), images.to(dtype),
                      texts.to(dtype), logit_scale, negatives.to(dtype))
    ref = clip_loss_reference(images.to(dtype).double(), texts.to(dtype).double(), logit_scale.double(),
                              negatives.to(dtype).double())
    assert ours.dtype == torch.float32 and grads[0].dtype == dtype
    # Same rounded inputs, fp32 arithmetic inside: fp32 rounding of logits <= 14.3 only.
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)


def test_from_config_and_float_logit_scale():
    loss_fn = ContrastiveLoss.from_config(LossConfig(impl="reference", max_logit_scale=20.0, chunk_size=4))
    assert (loss_fn.impl, loss_fn.max_logit_scale, loss_fn.chunk_size) == ("reference", 20.0, 4)
    assert loss_fn.deterministic is False
    assert ContrastiveLoss.from_config(LossConfig(deterministic=True)).deterministic is True
    images, texts = features(3, 8, 17), features(3, 8, 18)
    a = loss_fn(images, texts, 1.0)
    b = clip_loss_reference(images, texts, torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)  # fp32 rounding of the result


@pytest.mark.parametrize("call, message", [
    (lambda f, i, t, s: f(i, t[:3], s), r"must both be \[B, D\]"),
    (lambda f, i, t, s: f(i[:0], t[:0], s), "the batch is empty"),
    (lambda f, i, t, s: f(i, t.float(), s), "must share a dtype"),
    (lambda f, i, t, s: f(i, t, torch.zeros(2)), r"logit_scale must hold one value .* got shape \(2,\)"),
    (lambda f, i, t, s: f(i, t, s, torch.zeros(3, 7, dtype=i.dtype)), r"negative_features must be \[n, D=8\]"),
    (lambda f, i, t, s: f(i, t, s, torch.zeros(3, 8, dtype=i.dtype), torch.ones(2, dtype=torch.bool)),
     r"negative_mask must be a bool tensor of shape \[3\]"),
    (lambda f, i, t, s: f(i, t, s, None, torch.ones(2, dtype=torch.bool)), "negative_mask was given without"),
])
def test_bad_inputs_raise_value_error(call, message):
    images, texts = features(5, 8, 19), features(5, 8, 20)
    with pytest.raises(ValueError, match=message):
        call(ContrastiveLoss(impl="chunked"), images, texts, torch.tensor(1.0))


@pytest.mark.parametrize("kwargs, message", [
    (dict(impl="fused"), "loss impl must be one of auto, triton, chunked, reference, got 'fused'"),
    (dict(max_logit_scale=0.0), "max_logit_scale must be > 0, got 0.0"),
    (dict(chunk_size=0), "chunk_size must be a positive integer, got 0"),
])
def test_bad_construction_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContrastiveLoss(**kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_at_most_one_host_sync_per_call_on_cuda(impl):
    """Forward + backward of one loss call on CUDA reads at most one value back to the host (the mask check)."""
    import warnings
    device = torch.device("cuda")
    images, texts = features(300, 64, 0).to(device, torch.bfloat16), features(300, 64, 1).to(device, torch.bfloat16)
    negatives = features(200, 64, 2).to(device, torch.bfloat16)
    mask = (torch.arange(200, device=device) % 3) != 0
    loss_fn = ContrastiveLoss(impl=impl)
    leaves = [t.requires_grad_(True) for t in (images, texts, negatives)]
    logit_scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)
    loss_fn(leaves[0], leaves[1], logit_scale, leaves[2], mask).backward()  # autotuning and caches first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss_fn(leaves[0], leaves[1], logit_scale, leaves[2], mask).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]
    assert leaves[0].grad.dtype == torch.bfloat16  # gradients come back in the feature dtype
