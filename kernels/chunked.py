"""Contrastive cross-entropy in pure torch, tile by tile, never holding the (R, M) logits.

Algorithm. Rows are taken in blocks of `chunk_size` and, inside a row block, columns in blocks of `chunk_size`.
Forward keeps a running row maximum m and a running sum l of exp(logit - m) in fp32 (online log-sum-exp, as in
flash-attention), so each (chunk, chunk) tile of logits is built, folded into (m, l) and dropped. Only the per-row
LSE [R] is saved. Backward rebuilds every tile from the saved LSE:

    p_ij      = exp(s * q_i . k_j - lse_i)            (0 on masked columns)
    dlogit_ij = g_i * (p_ij - [j == t_i])
    dq_i      = s * sum_j dlogit_ij k_j        dk_j = s * sum_i dlogit_ij q_i
    ds        = sum_ij dlogit_ij (q_i . k_j)

The target term (-[j == t_i]) is applied once per row with a gather and an index_add instead of inside the tiles.

Memory: O(chunk^2) for a tile plus O((R + M) * D) for the fp32 gradient accumulators; never O(R * M).
Compute: forward one R x M x D matmul, backward three (the recomputed tile, dQ, dK), against one and two for the
materialised reference.
"""
from __future__ import annotations

import torch

from .reference import compute_dtype


def _logits_tile(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor,
                 mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw similarities, scaled and masked logits) of one (rows, cols) tile."""
    qk = q @ k.T  # (rows, cols)
    logits = qk * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return qk, logits


class _ChunkedContrastiveCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                key_mask: torch.Tensor | None, chunk_size: int) -> torch.Tensor:
        dtype = compute_dtype(queries, keys)
        q_all, k_all = queries.to(dtype), keys.to(dtype)
        s = scale.detach().to(dtype)
        num_rows, num_cols = q_all.shape[0], k_all.shape[0]
        targets = targets.long()
        lse = torch.empty(num_rows, dtype=dtype, device=queries.device)
        target_logit = torch.empty(num_rows, dtype=dtype, device=queries.device)
        # A finite floor instead of -inf keeps exp(m_old - m_new) defined while a row has seen only masked columns.
        floor = torch.finfo(dtype).min
        for r0 in range(0, num_rows, chunk_size):
            r1 = min(r0 + chunk_size, num_rows)
            q = q_all[r0:r1]  # (rows, D)
            m = torch.full((r1 - r0,), floor, dtype=dtype, device=queries.device)
            l = torch.zeros(r1 - r0, dtype=dtype, device=queries.device)
            for c0 in range(0, num_cols, chunk_size):
                c1 = min(c0 + chunk_size, num_cols)
                mask = None if key_mask is None else key_mask[c0:c1]
                _, logits = _logits_tile(q, k_all[c0:c1], s, mask)  # (rows, cols)
                m_new = torch.maximum(m, logits.amax(dim=1))
                l = l * torch.exp(m - m_new) + torch.exp(logits - m_new[:, None]).sum(dim=1)
                m = m_new
            lse[r0:r1] = m + torch.log(l)
            target_logit[r0:r1] = s * (q * k_all[targets[r0:r1]]).sum(dim=1)
        ctx.save_for_backward(queries, keys, targets, scale, key_mask, lse)
        ctx.chunk_size = chunk_size
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        queries, keys, targets, scale, key_mask, lse = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        need_q, need_k, _, need_s = ctx.needs_input_grad[:4]
        dtype = lse.dtype
        q_all, k_all = queries.to(dtype), keys.to(dtype)
        s = scale.detach().to(dtype)
        g_all = grad_loss.to(dtype)
        num_rows, num_cols = q_all.shape[0], k_all.shape[0]
        dq_all = torch.zeros_like(q_all)  # (R, D), accumulated in fp32/fp64
        dk_all = torch.zeros_like(k_all)  # (M, D)
        ds = torch.zeros((), dtype=dtype, device=queries.device)
        for r0 in range(0, num_rows, chunk_size):
            r1 = min(r0 + chunk_size, num_rows)
            q, g = q_all[r0:r1], g_all[r0:r1]
            lse_rows = lse[r0:r1, None]
            for c0 in range(0, num_cols, chunk_size):
                c1 = min(c0 + chunk_size, num_cols)
                k = k_all[c0:c1]
                mask = None if key_mask is None else key_mask[c0:c1]
                qk, logits = _logits_tile(q, k, s, mask)
                dlogits = torch.exp(logits - lse_rows) * g[:, None]  # (rows, cols), softmax part only
                if need_q:
                    dq_all[r0:r1] += dlogits @ k
                if need_k:
                    dk_all[c0:c1] += dlogits.T @ q
                if need_s:
                    ds += (dlogits * qk).sum()
            # The -[j == t_i] part of the softmax gradient, once per row.
            tgt = targets[r0:r1]
            k_tgt = k_all[tgt]  # (rows, D)
            if need_q:
                dq_all[r0:r1] -= g[:, None] * k_tgt
            if need_k:
                dk_all.index_add_(0, tgt, -g[:, None] * q)
            if need_s:
                ds -= (g * (q * k_tgt).sum(dim=1)).sum()
        dq = (dq_all * s).to(queries.dtype) if need_q else None
        dk = (dk_all * s).to(keys.dtype) if need_k else None
        dscale = ds.to(scale.dtype) if need_s else None
        return dq, dk, None, dscale, None, None


def contrastive_ce_chunked(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                           key_mask: torch.Tensor | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Per-row contrastive CE, tiled. Inputs as `clove_kernels.contrastive_ce` (already validated there);
    returns [R] in fp32 (fp64 for fp64 inputs)."""
    assert chunk_size > 0 and scale.dim() == 0
    return _ChunkedContrastiveCE.apply(queries, keys, targets, scale, key_mask, chunk_size)
