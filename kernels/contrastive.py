"""Fused contrastive cross-entropy in Triton: loss and exact gradients without materialising the logits.

    loss_i = logsumexp_j(s * q_i . k_j  over valid j) - s * q_i . k_{t_i}          q [R, D], k [M, D], t [R]

Algorithm
  forward  (grid: one program per BLOCK_M rows)
      for each BLOCK_N column block: acc = Q_blk @ K_blk^T, accumulated over BLOCK_D slices of D in fp32;
      logits = s * acc, masked columns -> -inf; the running row max m and sum l of exp(logits - m) are updated
      (online log-sum-exp) and the target logit is picked out of the same tile. Stores lse [R] and loss [R] only.
  backward (two kernels, no atomics, deterministic)
      dlogit_ij = g_i * (exp(s * acc_ij - lse_i) - [j == t_i]), rebuilt tile by tile from the saved lse.
      dQ kernel, one program per BLOCK_M rows:    dQ_blk += s * dlogit @ K_blk   and ds_i = sum_j dlogit_ij acc_ij
      dK kernel, one program per BLOCK_N columns: dK_blk += s * dlogit^T @ Q_blk
      Each program owns its rows (columns) of dQ (dK), so the fp32 accumulators are read-modified-written in
      global memory without atomics. ds = sum_i ds_i is summed by torch in a fixed order.

Memory traffic (elements, P = D-slices per tile)
  forward: Q read M/BLOCK_N times, K read R/BLOCK_M times, 2R written. Extra memory: lse [R] fp32.
  backward: each kernel re-reads Q and K as the forward does; the dQ kernel also reads and writes its fp32 dQ
  rows once per column block (R * D * M / BLOCK_N), the dK kernel its dK rows once per row block. The R x M
  logits never touch global memory. Extra memory: fp32 dQ [R, D], dK [M, D], ds_i [R].
  Compute: 1 (forward) + 2 + 2 (backward) R x M x D matmuls, against 3 for materialised logits.

Limitations
  - D is not held in on-chip memory (CLIP's D = 512..1024 is too wide), so Q/K tiles are streamed BLOCK_D at a time
    and every column block re-reads Q's D slices (from L2 in practice).
  - The backward computes the logits tile twice (once per gradient kernel), trading compute for determinism.
  - fp32 inputs use IEEE fp32 dots (no TF32) so results match the fp32 reference; bf16/fp16 inputs use native
    low-precision dots with fp32 accumulation, and dlogit is rounded to the input dtype for the gradient dots,
    as flash-attention does.
  - fp64 inputs are computed in fp32.
  - Offsets are int32: shapes whose row x stride reaches 2^31 are refused with a ValueError. The block kernels
    (block_triton.py, what ContrastiveLoss runs) use int64 offsets.
  - Under TRITON_INTERPRET=1 (CPU) every tile is upcast to fp32 before tl.dot: the interpreter's bf16 dot returns
    garbage in triton 3.8. The interpreter is for correctness tests only; it is orders of magnitude slower.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreter_active() -> bool:
    """Whether triton currently runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


# Fixed when this module is imported, like the kernels below (triton.jit picks interpreter mode at decoration).
INTERPRETED = interpreter_active()


def _autotune_configs() -> list[triton.Config]:
    """Tile shapes to try; on the CPU interpreter one small config (there is nothing to tune there)."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64}, num_warps=1, num_stages=1)]
    # 64 x 64 tiles, 8 warps, D in slices of 32: every other shape tried spills registers for bf16/fp16 on sm_80
    # or sm_90a (benchmarks/results/kernels_compile.md), which tests/test_kernels_compile.py forbids.
    configs = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32}, num_warps=8, num_stages=num_stages)
               for num_stages in (2, 3)]
    return configs


@triton.jit
def _qk_tile(q_ptr, k_ptr, offs_m, offs_n, R, M, D,
             stride_qm, stride_qd, stride_km, stride_kd,
             UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 tile of Q @ K^T, summed over D in BLOCK_D slices (masked tails read as 0)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=(offs_m[:, None] < R) & (offs_d[None, :] < D), other=0.0)  # (BLOCK_M, BLOCK_D)
        k = tl.load(k_ptr + offs_n[:, None] * stride_km + offs_d[None, :] * stride_kd,
                    mask=(offs_n[:, None] < M) & (offs_d[None, :] < D), other=0.0)  # (BLOCK_N, BLOCK_D)
        if UPCAST:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _valid_columns(mask_ptr, offs_n, M, HAS_MASK: tl.constexpr):
    valid = offs_n < M
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + offs_n, mask=offs_n < M, other=0) != 0)
    return valid


@triton.autotune(configs=_autotune_configs(), key=["D"])
@triton.jit
def _contrastive_fwd_kernel(
    # pointers
    q_ptr, k_ptr, targets_ptr, mask_ptr, scale_ptr, lse_ptr, loss_ptr,
    # sizes
    R, M, D,
    # strides
    stride_qm, stride_qd, stride_km, stride_kd,
    # meta-parameters
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = offs_m < R
    tgt = tl.load(targets_ptr + offs_m, mask=row_valid, other=-1)
    s = tl.load(scale_ptr).to(tl.float32)
    # A finite floor instead of -inf keeps exp(m_old - m_new) defined while a row has seen only masked columns.
    m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        acc = _qk_tile(q_ptr, k_ptr, offs_m, offs_n, R, M, D, stride_qm, stride_qd, stride_km, stride_kd,
                       UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        col_valid = _valid_columns(mask_ptr, offs_n, M, HAS_MASK)
        logits = tl.where(col_valid[None, :], acc * s, float("-inf"))  # (BLOCK_M, BLOCK_N)
        is_target = offs_n[None, :] == tgt[:, None]
        target_logit += tl.sum(tl.where(is_target, logits, 0.0), axis=1)
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    tl.store(lse_ptr + offs_m, lse, mask=row_valid)
    tl.store(loss_ptr + offs_m, lse - target_logit, mask=row_valid)


@triton.jit
def _dlogits_tile(acc, s, lse, g, tgt, offs_n, col_valid):
    """dloss/dlogit for one tile: g_i * (softmax_ij - [j == t_i]); 0 on masked and out-of-range columns."""
    # Masked columns become -inf before exp: their logits may exceed lse (they were left out of it) and overflow.
    logits = tl.where(col_valid[None, :], acc * s, float("-inf"))
    p = tl.exp(logits - lse[:, None])
    onehot = tl.where(offs_n[None, :] == tgt[:, None], 1.0, 0.0)
    return g[:, None] * (p - onehot)


@triton.autotune(configs=_autotune_configs(), key=["D"], reset_to_zero=["dq_ptr"])
@triton.jit
def _contrastive_bwd_dq_kernel(
    # pointers
    q_ptr, k_ptr, targets_ptr, mask_ptr, scale_ptr, lse_ptr, grad_ptr, dq_ptr, ds_rows_ptr,
    # sizes
    R, M, D,
    # strides
    stride_qm, stride_qd, stride_km, stride_kd, stride_dqm, stride_dqd,
    # meta-parameters
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = offs_m < R
    tgt = tl.load(targets_ptr + offs_m, mask=row_valid, other=-1)
    lse = tl.load(lse_ptr + offs_m, mask=row_valid, other=0.0)
    g = tl.load(grad_ptr + offs_m, mask=row_valid, other=0.0)
    s = tl.load(scale_ptr).to(tl.float32)
    ds_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, M, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        acc = _qk_tile(q_ptr, k_ptr, offs_m, offs_n, R, M, D, stride_qm, stride_qd, stride_km, stride_kd,
                       UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        col_valid = _valid_columns(mask_ptr, offs_n, M, HAS_MASK)
        dlogits = _dlogits_tile(acc, s, lse, g, tgt, offs_n, col_valid)  # (BLOCK_M, BLOCK_N)
        ds_i += tl.sum(dlogits * acc, axis=1)
        dlogits = dlogits * s
        # This program owns these dQ rows: read-modify-write, D slice by D slice, no atomics.
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            k = tl.load(k_ptr + offs_n[:, None] * stride_km + offs_d[None, :] * stride_kd,
                        mask=(offs_n[:, None] < M) & (offs_d[None, :] < D), other=0.0)  # (BLOCK_N, BLOCK_D)
            if UPCAST:
                k = k.to(tl.float32)
            dq_ptrs = dq_ptr + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
            dq_mask = row_valid[:, None] & (offs_d[None, :] < D)
            dq = tl.load(dq_ptrs, mask=dq_mask, other=0.0)
            dq = tl.dot(dlogits.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
            tl.store(dq_ptrs, dq, mask=dq_mask)
    tl.store(ds_rows_ptr + offs_m, ds_i, mask=row_valid)


@triton.autotune(configs=_autotune_configs(), key=["D"], reset_to_zero=["dk_ptr"])
@triton.jit
def _contrastive_bwd_dk_kernel(
    # pointers
    q_ptr, k_ptr, targets_ptr, mask_ptr, scale_ptr, lse_ptr, grad_ptr, dk_ptr,
    # sizes
    R, M, D,
    # strides
    stride_qm, stride_qd, stride_km, stride_kd, stride_dkm, stride_dkd,
    # meta-parameters
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = _valid_columns(mask_ptr, offs_n, M, HAS_MASK)
    s = tl.load(scale_ptr).to(tl.float32)
    for m0 in range(0, R, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_valid = offs_m < R
        tgt = tl.load(targets_ptr + offs_m, mask=row_valid, other=-1)
        lse = tl.load(lse_ptr + offs_m, mask=row_valid, other=0.0)
        g = tl.load(grad_ptr + offs_m, mask=row_valid, other=0.0)
        acc = _qk_tile(q_ptr, k_ptr, offs_m, offs_n, R, M, D, stride_qm, stride_qd, stride_km, stride_kd,
                       UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        dlogits = _dlogits_tile(acc, s, lse, g, tgt, offs_n, col_valid) * s  # (BLOCK_M, BLOCK_N)
        # This program owns these dK rows: read-modify-write, D slice by D slice, no atomics.
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            q = tl.load(q_ptr + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask=row_valid[:, None] & (offs_d[None, :] < D), other=0.0)  # (BLOCK_M, BLOCK_D)
            if UPCAST:
                q = q.to(tl.float32)
            dk_ptrs = dk_ptr + offs_n[:, None] * stride_dkm + offs_d[None, :] * stride_dkd
            dk_mask = (offs_n[:, None] < M) & (offs_d[None, :] < D)
            dk = tl.load(dk_ptrs, mask=dk_mask, other=0.0)
            dk = tl.dot(tl.trans(dlogits.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)
            tl.store(dk_ptrs, dk, mask=dk_mask)


def _prepare(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
             key_mask: torch.Tensor | None):
    """Host-side checks and conversions shared by forward and backward."""
    if queries.dtype == torch.float64:  # documented limitation: fp64 runs in fp32
        queries, keys = queries.float(), keys.float()
    assert queries.dtype in (torch.float32, torch.bfloat16, torch.float16), queries.dtype
    assert queries.dtype == keys.dtype and queries.device == keys.device
    assert queries.shape[1] == keys.shape[1] and targets.shape[0] == queries.shape[0]
    # These kernels index with int32 offsets (row * stride): refuse shapes that would wrap rather than read garbage.
    span = max(queries.shape[0] * queries.stride(0), keys.shape[0] * keys.stride(0),
               queries.shape[1] * max(queries.stride(1), keys.stride(1)))
    if span >= 2**31:
        raise ValueError(f"per-direction Triton kernels index with int32 offsets: shapes {tuple(queries.shape)} x "
                         f"{tuple(keys.shape)} would wrap; use the block API (int64 offsets) or impl='chunked'")
    targets = targets.to(torch.int64).contiguous()
    scale32 = scale.detach().to(torch.float32).reshape(1).contiguous()
    mask_i8 = None if key_mask is None else key_mask.to(torch.int8).contiguous()
    # fp32 inputs: IEEE dots, no TF32, so results match the fp32 reference. For bf16/fp16 the setting has no effect.
    meta = dict(HAS_MASK=mask_i8 is not None, UPCAST=INTERPRETED,
                DOT_PRECISION="ieee" if queries.dtype == torch.float32 else "tf32")
    return queries, keys, targets, scale32, mask_i8, meta


def _forward(queries, keys, targets, scale32, mask_i8, meta):
    num_rows, dim = queries.shape
    num_cols = keys.shape[0]
    lse = torch.empty(num_rows, dtype=torch.float32, device=queries.device)
    loss = torch.empty(num_rows, dtype=torch.float32, device=queries.device)
    if num_rows == 0:
        return loss, lse
    mask_arg = mask_i8 if mask_i8 is not None else targets  # never read when HAS_MASK is False
    grid = lambda META: (triton.cdiv(num_rows, META["BLOCK_M"]),)  # noqa: E731
    _contrastive_fwd_kernel[grid](
        queries, keys, targets, mask_arg, scale32, lse, loss,
        num_rows, num_cols, dim,
        queries.stride(0), queries.stride(1), keys.stride(0), keys.stride(1),
        **meta)
    return loss, lse


def _backward(queries, keys, targets, scale32, mask_i8, meta, lse, grad_loss, need_q, need_k):
    num_rows, dim = queries.shape
    num_cols = keys.shape[0]
    device = queries.device
    grad_loss = grad_loss.to(torch.float32).contiguous()
    mask_arg = mask_i8 if mask_i8 is not None else targets
    dq = torch.zeros(num_rows, dim, dtype=torch.float32, device=device)
    dk = torch.zeros(num_cols, dim, dtype=torch.float32, device=device)
    ds_rows = torch.zeros(num_rows, dtype=torch.float32, device=device)
    if num_rows == 0:
        return dq, dk, ds_rows.sum()
    # The dQ kernel also produces ds, so it runs whenever the scale (or queries) need a gradient.
    grid_rows = lambda META: (triton.cdiv(num_rows, META["BLOCK_M"]),)  # noqa: E731
    _contrastive_bwd_dq_kernel[grid_rows](
        queries, keys, targets, mask_arg, scale32, lse, grad_loss, dq, ds_rows,
        num_rows, num_cols, dim,
        queries.stride(0), queries.stride(1), keys.stride(0), keys.stride(1), dq.stride(0), dq.stride(1),
        **meta)
    if need_k:
        grid_cols = lambda META: (triton.cdiv(num_cols, META["BLOCK_N"]),)  # noqa: E731
        _contrastive_bwd_dk_kernel[grid_cols](
            queries, keys, targets, mask_arg, scale32, lse, grad_loss, dk,
            num_rows, num_cols, dim,
            queries.stride(0), queries.stride(1), keys.stride(0), keys.stride(1), dk.stride(0), dk.stride(1),
            **meta)
    return dq, dk, ds_rows.sum()


class _TritonContrastiveCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        q, k, tgt, scale32, mask_i8, meta = _prepare(queries, keys, targets, scale, key_mask)
        loss, lse = _forward(q, k, tgt, scale32, mask_i8, meta)
        ctx.save_for_backward(queries, keys, tgt, scale, mask_i8, lse)
        ctx.meta = meta
        out_dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
        return loss.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        queries, keys, tgt, scale, mask_i8, lse = ctx.saved_tensors
        need_q, need_k, _, need_s = ctx.needs_input_grad[:4]
        q, k = queries, keys
        if q.dtype == torch.float64:
            q, k = q.float(), k.float()
        scale32 = scale.detach().to(torch.float32).reshape(1).contiguous()
        dq, dk, ds = _backward(q, k, tgt, scale32, mask_i8, ctx.meta, lse, grad_loss, need_q, need_k)
        return (dq.to(queries.dtype) if need_q else None, dk.to(keys.dtype) if need_k else None, None,
                ds.to(scale.dtype) if need_s else None, None)


def contrastive_ce_triton(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                          key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row contrastive CE with the fused Triton kernels.

    queries [R, D], keys [M, D] (fp32/bf16/fp16, any strides, same device: CUDA, or CPU under TRITON_INTERPRET=1),
    targets [R] int64, scale 0-dim, key_mask [M] bool or None. Inputs are validated by
    `clove_kernels.contrastive_ce`. Returns [R] fp32 (fp64 for fp64 inputs, computed in fp32).
    """
    assert scale.dim() == 0
    return _TritonContrastiveCE.apply(queries, keys, targets, scale, key_mask)
