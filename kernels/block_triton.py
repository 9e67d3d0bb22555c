"""The block API (kernels/block.py) in Triton: one row block of the logits, both directions from the same tiles.

    S = s * Q K^T      Q [R, D] (this rank's images), K [M, D] (all texts, then all negatives), stat columns j < C

Algorithm
  forward  grid (row groups, column splits): each program owns a rectangle of S, walks its row blocks and, inside,
      its column blocks. Per tile: acc = Q_blk K_blk^T over D in BLOCK_D slices (fp32 accumulate), logits = s acc,
      masked columns -inf. Row statistics (max m, sum l of exp(logits - m)) run online across the program's column
      blocks and are stored per (split, row); column statistics of stat columns run across the program's row
      blocks in its own slice of a [row groups, C] scratch (read-modify-write, no atomics). A second small step
      combines the partial (m, l) of all splits / groups: row LSE [R] complete, column LSE [C] partial over Q.
      With many rows the grid is row groups x 1; with few rows (a rank's 256 images against 256k columns) the
      columns are split so that about twice the SM count of programs run.
  backward (default) one fused kernel, grid (row blocks, column splits):
      dS_ij = a_i exp(S_ij - row_lse_i) + b_j exp(S_ij - col_lse_j) [j < C] + c_i [j == t_i]
      Each program recomputes each of its tiles of S once, forms dS, and for every BLOCK_D slice does
      dQ_part += dS K_slice (its own rows of a per-split fp32 partial, read-modify-written, no atomics) and
      dK += dS^T Q_slice, added with fp32 atomics into one [M, D] buffer that all row blocks share.
      Splits > 1 only when row blocks are few; partials over splits are summed by torch in a fixed order.
      Traffic of dK: every element receives one atomic fp32 add per row block (R / BLOCK_M), L2-resident, in
      place of the deterministic path's read-modify-write of its per-split partial.
  backward (deterministic=True, config `loss.deterministic`) two kernels, no atomics (same bits for the same
      autotuned configuration; the autotuner picks by timing, so another process may pick another BLOCK_D):
      dQ kernel, grid (row blocks, splits):   dQ_part += dS K_blk  (as above, without dK)
      dK kernel, grid (column blocks, splits): dK_part += dS^T Q_blk  (its own rows of a per-split partial)
      Each recomputes its tiles of S. Without dK (need_k=False) only the dQ kernel runs, on either setting.

Precision: bf16/fp16 tiles go to tl.dot as they are (tensor cores, fp32 accumulate); fp32 inputs use TF32 dots unless
allow_tf32=False (then IEEE fp32 FMA loops). dS is rounded to the input dtype before the gradient dots, as
flash-attention does. Statistics and loss in fp32; gradients returned in the input dtype.
Offsets are int64 (row index * stride), so no shape wraps.

Compute, in R x M x D products: forward 1; fused backward 1 recompute + dQ + dK = 3, so 4 in all (against 10 for
two independent directions); deterministic backward 2 recomputes + 2 = 4, so 5 in all. Atomics make the order in
which row blocks add into dK vary: fused dK differs run to run in the last bits (fp32 rounding of the sum), dQ and
dscale do not. Set `loss.deterministic: true` for gradients free of atomics.
Limitation: D is streamed in BLOCK_D slices (CLIP's D of 512..1024 does not fit on chip).
Under TRITON_INTERPRET=1 (CPU) tiles are upcast to fp32 before tl.dot: the interpreter's bf16 dot is wrong in
triton 3.8.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block import BlockStats
from .contrastive import INTERPRETED

# Row / column tile of every kernel; BLOCK_D, warps and stages are autotuned. Fixed here because the host sizes
# the split scratch buffers from them before launch. 128 x 128 tiles spill registers (ptxas: 255 registers and
# 0.4-2.3 KB of spills per thread with 4 warps); 64 x 64 tiles do not.
BLOCK_M = 64
BLOCK_N = 64
SCRATCH_BYTES = 256 * 2**20  # cap of a split path's partial gradient buffer


def autotune_configs() -> list[triton.Config]:
    """BLOCK_D x warps x stages; one small config in the interpreter (nothing to tune there). Every config here
    compiles without register spills for bf16/fp16 on sm_90a and sm_80 (benchmarks/results/kernels_compile.md;
    tests/test_kernels_compile.py keeps it so)."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_D": 32}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_D": block_d}, num_warps=num_warps, num_stages=num_stages)
            for block_d, num_warps, num_stages in ((32, 4, 2), (64, 4, 2), (64, 4, 3), (64, 8, 3))]


AUTOTUNE_KEY = ["R_BUCKET", "M_BUCKET", "D", "HAS_MASK"]


@triton.jit
def _tile(q_ptr, k_ptr, offs_m, offs_n, row_valid, col_in, D, stride_qm, stride_km,
          UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 tile of Q K^T over D in BLOCK_D slices; rows of unit stride along D."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    q_rows = q_ptr + offs_m.to(tl.int64)[:, None] * stride_qm
    k_rows = k_ptr + offs_n.to(tl.int64)[:, None] * stride_km
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(q_rows + offs_d[None, :], mask=row_valid[:, None] & (offs_d[None, :] < D), other=0.0)
        k = tl.load(k_rows + offs_d[None, :], mask=col_in[:, None] & (offs_d[None, :] < D), other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            k = k.to(tl.float32)
        acc = tl.dot(q, tl.trans(k), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _col_valid(mask_ptr, offs_n, col_in, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        return col_in & (tl.load(mask_ptr + offs_n, mask=col_in, other=0) != 0)
    return col_in


# Timing runs of the autotuner must not leave their partial sums behind: restore / zero the accumulators.
@triton.autotune(configs=autotune_configs(), key=AUTOTUNE_KEY, restore_value=["col_m_ptr", "col_l_ptr"])
@triton.jit
def _block_fwd_kernel(
    # pointers
    q_ptr, k_ptr, targets_ptr, mask_ptr, scale_ptr, row_m_ptr, row_l_ptr, target_ptr, col_m_ptr, col_l_ptr,
    # sizes
    R, M, D, C, rows_per_group, cols_per_split, R_BUCKET, M_BUCKET,
    # strides (D has unit stride)
    stride_qm, stride_km,
    # meta-parameters
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    row_start = pid_r * rows_per_group
    row_end = tl.minimum(row_start + rows_per_group, R)
    col_start = pid_c * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, M)
    s = tl.load(scale_ptr)
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_valid = offs_m < row_end
        tgt = tl.load(targets_ptr + offs_m, mask=row_valid, other=-1)
        # A finite floor instead of -inf keeps exp(m_old - m_new) defined while a row has seen only masked columns.
        m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for n0 in range(col_start, col_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            col_in = offs_n < col_end
            acc = _tile(q_ptr, k_ptr, offs_m, offs_n, row_valid, col_in, D, stride_qm, stride_km,
                        UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
            col_valid = _col_valid(mask_ptr, offs_n, col_in, HAS_MASK)
            logits = tl.where(col_valid[None, :], acc * s, float("-inf"))  # (BLOCK_M, BLOCK_N)
            target_logit += tl.sum(tl.where(offs_n[None, :] == tgt[:, None], logits, 0.0), axis=1)
            m_new = tl.maximum(m_i, tl.max(logits, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
            m_i = m_new
            if n0 < C:
                # Column statistics over this program's rows, kept in its own slice of the scratch.
                stat = offs_n < C
                col_logits = tl.where(row_valid[:, None], logits, float("-inf"))
                cptr = pid_r.to(tl.int64) * C + offs_n
                cm_old = tl.load(col_m_ptr + cptr, mask=stat, other=-1.0e30)
                cl_old = tl.load(col_l_ptr + cptr, mask=stat, other=0.0)
                cm_new = tl.maximum(cm_old, tl.max(col_logits, axis=0))
                cl_new = cl_old * tl.exp(cm_old - cm_new) + tl.sum(tl.exp(col_logits - cm_new[None, :]), axis=0)
                tl.store(col_m_ptr + cptr, cm_new, mask=stat)
                tl.store(col_l_ptr + cptr, cl_new, mask=stat)
        rptr = pid_c.to(tl.int64) * R + offs_m
        tl.store(row_m_ptr + rptr, m_i, mask=row_valid)
        tl.store(row_l_ptr + rptr, l_i, mask=row_valid)
        in_split = row_valid & (tgt >= col_start) & (tgt < col_end)
        tl.store(target_ptr + offs_m, target_logit, mask=in_split)


@triton.jit
def _dlogits(acc, s, row_valid, col_valid, offs_n, tgt, row_lse, a, c, col_lse, b, C):
    """dS for one tile (fp32); 0 on masked columns and rows out of range."""
    # Masked columns become -inf before exp: their logits may exceed the LSE (they were left out of it).
    logits = tl.where(col_valid[None, :], acc * s, float("-inf"))
    d = a[:, None] * tl.exp(logits - row_lse[:, None])
    d += tl.where((offs_n < C)[None, :], b[None, :] * tl.exp(logits - col_lse[None, :]), 0.0)
    d += tl.where(offs_n[None, :] == tgt[:, None], c[:, None], 0.0)
    return tl.where(row_valid[:, None], d, 0.0)


@triton.jit
def _bwd_row_block(
    q_ptr, k_ptr, targets_ptr, mask_ptr, scale_ptr, row_lse_ptr, a_ptr, c_ptr, col_lse_ptr, b_ptr,
    dq_ptr, ds_ptr, dk_ptr, R, M, D, C, cols_per_split, stride_qm, stride_km,
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WITH_DK: tl.constexpr,
):
    """One program of the row-parallel backward: its row block against its split of the columns. Per tile, S is
    recomputed once and dS gives dQ_part += dS K_slice (its own rows of a per-split partial, read-modify-write)
    and, WITH_DK, dK += dS^T Q_slice by atomic adds (dK rows are shared by every row block)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = offs_m < R
    tgt = tl.load(targets_ptr + offs_m, mask=row_valid, other=-1)
    row_lse = tl.load(row_lse_ptr + offs_m, mask=row_valid, other=0.0)
    a = tl.load(a_ptr + offs_m, mask=row_valid, other=0.0)
    c = tl.load(c_ptr + offs_m, mask=row_valid, other=0.0)
    s = tl.load(scale_ptr)
    col_start = pid_c * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, M)
    q_rows = q_ptr + offs_m.to(tl.int64)[:, None] * stride_qm
    dq_rows = dq_ptr + (pid_c.to(tl.int64) * R + offs_m.to(tl.int64))[:, None] * D
    ds_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(col_start, col_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_in = offs_n < col_end
        acc = _tile(q_ptr, k_ptr, offs_m, offs_n, row_valid, col_in, D, stride_qm, stride_km,
                    UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        col_valid = _col_valid(mask_ptr, offs_n, col_in, HAS_MASK)
        col_lse = tl.load(col_lse_ptr + offs_n, mask=offs_n < C, other=0.0)
        b = tl.load(b_ptr + offs_n, mask=offs_n < C, other=0.0)
        dlogits = _dlogits(acc, s, row_valid, col_valid, offs_n, tgt, row_lse, a, c, col_lse, b, C)
        ds_i += tl.sum(dlogits * acc, axis=1)
        k_rows = k_ptr + offs_n.to(tl.int64)[:, None] * stride_km
        dk_rows = dk_ptr + offs_n.to(tl.int64)[:, None] * D
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_in = offs_d[None, :] < D
            k = tl.load(k_rows + offs_d[None, :], mask=col_in[:, None] & d_in, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            ds_tile = dlogits.to(k.dtype)  # (BLOCK_M, BLOCK_N), rounded to the input dtype for the dots
            dq_mask = row_valid[:, None] & d_in
            dq = tl.load(dq_rows + offs_d[None, :], mask=dq_mask, other=0.0)
            dq = tl.dot(ds_tile, k, dq, input_precision=DOT_PRECISION)
            tl.store(dq_rows + offs_d[None, :], dq, mask=dq_mask)
            if WITH_DK:
                q = tl.load(q_rows + offs_d[None, :], mask=row_valid[:, None] & d_in, other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                dk = tl.dot(tl.trans(ds_tile), q, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_D)
                tl.atomic_add(dk_rows + offs_d[None, :], dk, mask=col_in[:, None] & d_in, sem="relaxed")
    tl.store(ds_ptr + pid_c.to(tl.int64) * R + offs_m, ds_i, mask=row_valid)


@triton.autotune(configs=autotune_configs(), key=AUTOTUNE_KEY, reset_to_zero=["dq_ptr"])
@triton.jit
def _block_bwd_dq_kernel(
    # pointers
    q_ptr, k_ptr, targets_ptr, mask_ptr, scale_ptr, row_lse_ptr, a_ptr, c_ptr, col_lse_ptr, b_ptr,
    dq_ptr, ds_ptr,
    # sizes
    R, M, D, C, cols_per_split, R_BUCKET, M_BUCKET,
    # strides (D has unit stride; dq is [splits, R, D] contiguous)
    stride_qm, stride_km,
    # meta-parameters
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ (and the per-row dscale terms) alone: the deterministic path, and the backward when dK is not needed."""
    _bwd_row_block(q_ptr, k_ptr, targets_ptr, mask_ptr, scale_ptr, row_lse_ptr, a_ptr, c_ptr, col_lse_ptr, b_ptr,
                   dq_ptr, ds_ptr, dq_ptr, R, M, D, C, cols_per_split, stride_qm, stride_km,
                   HAS_MASK, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, False)


@triton.autotune(configs=autotune_configs(), key=AUTOTUNE_KEY, reset_to_zero=["dk_ptr"])
@triton.jit
def _block_bwd_dk_kernel(
    # pointers
    q_ptr, k_ptr, targets_ptr, mask_ptr, scale_ptr, row_lse_ptr, a_ptr, c_ptr, col_lse_ptr, b_ptr, dk_ptr,
    # sizes
    R, M, D, C, rows_per_split, R_BUCKET, M_BUCKET,
    # strides (D has unit stride; dk is [splits, M, D] contiguous)
    stride_qm, stride_km,
    # meta-parameters
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_n = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    col_in = offs_n < M
    col_valid = _col_valid(mask_ptr, offs_n, col_in, HAS_MASK)
    col_lse = tl.load(col_lse_ptr + offs_n, mask=offs_n < C, other=0.0)
    b = tl.load(b_ptr + offs_n, mask=offs_n < C, other=0.0)
    s = tl.load(scale_ptr)
    row_start = pid_r * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, R)
    dk_rows = dk_ptr + (pid_r.to(tl.int64) * M + offs_n.to(tl.int64))[:, None] * D
    for m0 in range(row_start, row_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_valid = offs_m < row_end
        tgt = tl.load(targets_ptr + offs_m, mask=row_valid, other=-1)
        row_lse = tl.load(row_lse_ptr + offs_m, mask=row_valid, other=0.0)
        a = tl.load(a_ptr + offs_m, mask=row_valid, other=0.0)
        c = tl.load(c_ptr + offs_m, mask=row_valid, other=0.0)
        acc = _tile(q_ptr, k_ptr, offs_m, offs_n, row_valid, col_in, D, stride_qm, stride_km,
                    UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        dlogits = _dlogits(acc, s, row_valid, col_valid, offs_n, tgt, row_lse, a, c, col_lse, b, C)
        q_rows = q_ptr + offs_m.to(tl.int64)[:, None] * stride_qm
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            q = tl.load(q_rows + offs_d[None, :], mask=row_valid[:, None] & (offs_d[None, :] < D), other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            dk_mask = col_in[:, None] & (offs_d[None, :] < D)
            dk = tl.load(dk_rows + offs_d[None, :], mask=dk_mask, other=0.0)
            dk = tl.dot(tl.trans(dlogits.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)
            tl.store(dk_rows + offs_d[None, :], dk, mask=dk_mask)


def fused_autotune_configs() -> list[triton.Config]:
    """Configs of the fused backward kernel. It holds the dS tile, a dQ slice and a dK slice per BLOCK_D step, so
    D slices of 64 spill on sm_80 (ptxas: 24-316 B per thread with 4 or 8 warps); slices of 32 do not, on sm_90a
    or sm_80, for bf16/fp16 (benchmarks/results/kernels_compile.md; tests/test_kernels_compile.py keeps it so)."""
    if INTERPRETED:
        return autotune_configs()
    return [triton.Config({"BLOCK_D": 32}, num_warps=num_warps, num_stages=num_stages)
            for num_warps, num_stages in ((4, 2), (4, 3), (8, 2), (8, 3))]


@triton.autotune(configs=fused_autotune_configs(), key=AUTOTUNE_KEY, reset_to_zero=["dq_ptr", "dk_ptr"])
@triton.jit
def _block_bwd_fused_kernel(
    # pointers
    q_ptr, k_ptr, targets_ptr, mask_ptr, scale_ptr, row_lse_ptr, a_ptr, c_ptr, col_lse_ptr, b_ptr,
    dq_ptr, ds_ptr, dk_ptr,
    # sizes
    R, M, D, C, cols_per_split, R_BUCKET, M_BUCKET,
    # strides (D has unit stride; dq is [splits, R, D], dk [M, D], both contiguous fp32)
    stride_qm, stride_km,
    # meta-parameters
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ and dK from one recompute of each tile of S (dK by fp32 atomic adds)."""
    _bwd_row_block(q_ptr, k_ptr, targets_ptr, mask_ptr, scale_ptr, row_lse_ptr, a_ptr, c_ptr, col_lse_ptr, b_ptr,
                   dq_ptr, ds_ptr, dk_ptr, R, M, D, C, cols_per_split, stride_qm, stride_km,
                   HAS_MASK, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D, True)


# --- host side -------------------------------------------------------------------------------------------------------

def agree_on_autotune(kernel, known_keys: set) -> None:
    """After a launch that may have autotuned: make every rank use rank 0's choice for the keys it just tuned.

    Each rank times configs on its own GPU and could pick another one, so ranks would run different kernels (and
    sum in different orders). Keys depend only on shapes that are equal on every rank of ContrastiveLoss (B, the
    gathered column count, D, dtype, the global mask flag), so every rank tunes the same new keys at the same call
    and can take part in one broadcast of config indices. Nothing happens for known keys, a single config, or
    without torch.distributed. The first call with a new key may still have run each rank's own pick."""
    dist = torch.distributed
    new = sorted((k for k in kernel.cache if k not in known_keys), key=repr)
    if not new or len(kernel.configs) < 2 or not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() == 1:
        return
    device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
              else torch.device("cpu"))
    index = [next((i for i, c in enumerate(kernel.configs) if c is kernel.cache[k]), 0) for k in new]
    choice = torch.tensor(index, dtype=torch.int64, device=device)
    dist.broadcast(choice, src=0)
    for key, i in zip(new, choice.tolist()):
        kernel.cache[key] = kernel.configs[i]


def _launch(kernel, grid, *args, **kwargs) -> None:
    known = set(getattr(kernel, "cache", {}))
    kernel[grid](*args, **kwargs)
    if hasattr(kernel, "cache"):
        agree_on_autotune(kernel, known)


def _bucket(n: int) -> int:
    """Autotune key of a size: its power of two (at least 1024), so 8 rows and 64k rows tune separately."""
    return max(1024, triton.next_power_of_2(max(n, 1)))


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs, so the split paths run in tests


def _splits(own_blocks: int, other_blocks: int, num_sms: int) -> int:
    """How many programs share one block's other axis: enough for ~2 programs per SM, at most one per block."""
    if own_blocks >= 2 * num_sms:
        return 1
    return max(1, min(other_blocks, triton.cdiv(2 * num_sms, max(own_blocks, 1))))


def _prepare(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
             key_mask: torch.Tensor | None, allow_tf32: bool):
    if queries.dtype == torch.float64:  # documented limitation: fp64 runs in fp32
        queries, keys = queries.float(), keys.float()
    # The kernels index D with unit stride; a transposed view is copied once here.
    queries = queries if queries.stride(-1) == 1 else queries.contiguous()
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    # fp32: TF32 tensor-core dots unless disallowed. bf16/fp16 dots are tensor-core dots whatever this says. The
    # interpreter computes upcast tiles exactly ("ieee"), its TF32 emulation would only add rounding.
    precision = "tf32" if allow_tf32 and not INTERPRETED else "ieee"
    meta = dict(HAS_MASK=key_mask is not None, UPCAST=INTERPRETED, DOT_PRECISION=precision)
    mask_i8 = key_mask.to(torch.int8).contiguous() if key_mask is not None else targets  # never read without mask
    return (queries, keys, targets.to(torch.int64).contiguous(), scale.detach().to(torch.float32).reshape(1),
            mask_i8, meta)


@torch.no_grad()
def block_forward_triton(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                         key_mask: torch.Tensor | None, num_col_stats: int, allow_tf32: bool = True) -> BlockStats:
    q, k, tgt, s, mask_arg, meta = _prepare(queries, keys, targets, scale, key_mask, allow_tf32)
    num_rows, dim = q.shape
    num_cols = k.shape[0]
    device = q.device
    row_blocks, col_blocks = triton.cdiv(num_rows, BLOCK_M), triton.cdiv(num_cols, BLOCK_N)
    num_sms = _num_sms(device)
    groups = max(1, min(row_blocks, 2 * num_sms))
    splits = _splits(groups, col_blocks, num_sms)
    rows_per_group = triton.cdiv(row_blocks, groups) * BLOCK_M
    groups = max(1, triton.cdiv(num_rows, rows_per_group))
    cols_per_split = triton.cdiv(col_blocks, splits) * BLOCK_N
    splits = max(1, triton.cdiv(num_cols, cols_per_split))
    f32 = dict(dtype=torch.float32, device=device)
    row_m = torch.full((splits, num_rows), -1.0e30, **f32)
    row_l = torch.zeros((splits, num_rows), **f32)
    target = torch.zeros(num_rows, **f32)
    col_m = torch.full((groups, num_col_stats), -1.0e30, **f32)
    col_l = torch.zeros((groups, num_col_stats), **f32)
    if num_rows and num_cols:
        _launch(_block_fwd_kernel, (groups, splits),
            q, k, tgt, mask_arg, s, row_m, row_l, target, col_m, col_l,
            num_rows, num_cols, dim, num_col_stats, rows_per_group, cols_per_split,
            _bucket(num_rows), _bucket(num_cols),
            q.stride(0), k.stride(0),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **meta)
    # The second, small step: combine the partial (max, sum) of every split / row group.
    row_lse = torch.logsumexp(row_m + torch.log(row_l), dim=0)
    col_lse = torch.logsumexp(col_m + torch.log(col_l), dim=0)
    return BlockStats(row_lse, target, col_lse)


@torch.no_grad()
def block_backward_triton(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                          key_mask: torch.Tensor | None, row_lse: torch.Tensor, col_lse: torch.Tensor,
                          grad_row_lse: torch.Tensor, grad_col_lse: torch.Tensor, grad_target: torch.Tensor,
                          need_q: bool = True, need_k: bool = True, allow_tf32: bool = True,
                          deterministic: bool = False
                          ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """dQ, dK (input dtype) and dscale. deterministic=False: one fused kernel (dK by atomic adds, 1 recompute of
    S); True: the dQ and dK kernels (no atomics: the same bits for a given config, 2 recomputes). Without need_k
    only the dQ kernel runs, which is both."""
    q, k, tgt, s, mask_arg, meta = _prepare(queries, keys, targets, scale, key_mask, allow_tf32)
    num_rows, dim = q.shape
    num_cols = k.shape[0]
    num_col_stats = col_lse.shape[0]
    device = q.device
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    row_lse, a, c, col_lse, b = (f32(t) for t in (row_lse, grad_row_lse, grad_target, col_lse, grad_col_lse))
    row_blocks, col_blocks = triton.cdiv(num_rows, BLOCK_M), triton.cdiv(num_cols, BLOCK_N)
    num_sms = _num_sms(device)
    buckets = (_bucket(num_rows), _bucket(num_cols))
    fused = need_k and not deterministic and num_rows > 0 and num_cols > 0
    dq = ds = dk = None
    if num_rows and num_cols:
        # Few row blocks: split the columns too, into partial dQ buffers no larger than SCRATCH_BYTES.
        splits = min(_splits(row_blocks, col_blocks, num_sms), max(1, SCRATCH_BYTES // max(1, num_rows * dim * 4)))
        cols_per_split = triton.cdiv(col_blocks, splits) * BLOCK_N
        splits = triton.cdiv(num_cols, cols_per_split)
        dq_part = torch.zeros((splits, num_rows, dim), dtype=torch.float32, device=device)
        ds_part = torch.zeros((splits, num_rows), dtype=torch.float32, device=device)
        args = (q, k, tgt, mask_arg, s, row_lse, a, c, col_lse, b, dq_part, ds_part)
        sizes = (num_rows, num_cols, dim, num_col_stats, cols_per_split, *buckets, q.stride(0), k.stride(0))
        if fused:
            dk_acc = torch.zeros((num_cols, dim), dtype=torch.float32, device=device)
            _launch(_block_bwd_fused_kernel, (row_blocks, splits), *args, dk_acc, *sizes,
                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **meta)
            dk = dk_acc * s
        else:
            _launch(_block_bwd_dq_kernel, (row_blocks, splits), *args, *sizes,
                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **meta)
        dq, ds = dq_part.sum(dim=0) * s, ds_part.sum()
    else:
        dq, ds = torch.zeros(num_rows, dim, dtype=torch.float32, device=device), torch.zeros((), device=device)
    if need_k and dk is None:
        if num_rows and num_cols:
            splits = min(_splits(col_blocks, row_blocks, num_sms), max(1, SCRATCH_BYTES // max(1, num_cols * dim * 4)))
            rows_per_split = triton.cdiv(row_blocks, splits) * BLOCK_M
            splits = triton.cdiv(num_rows, rows_per_split)
            dk_part = torch.zeros((splits, num_cols, dim), dtype=torch.float32, device=device)
            _launch(_block_bwd_dk_kernel, (col_blocks, splits),
                q, k, tgt, mask_arg, s, row_lse, a, c, col_lse, b, dk_part,
                num_rows, num_cols, dim, num_col_stats, rows_per_split, *buckets,
                q.stride(0), k.stride(0),
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, **meta)
            dk = dk_part.sum(dim=0) * s
        else:
            dk = torch.zeros(num_cols, dim, dtype=torch.float32, device=device)
    if dk is not None:
        dk = dk.to(keys.dtype)
    return (dq.to(queries.dtype) if need_q else None), dk, ds.reshape(())
