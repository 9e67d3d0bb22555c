"""Contrastive cross-entropy in pure torch, tile by tile, never holding the (R, M) logits.

Algorithm. Rows are taken in blocks of `chunk_size` and, inside a row block, columns in blocks of `chunk_size`.
Forward folds each (chunk, chunk) tile of logits into a running per-row log-sum-exp in fp32 (online LSE: the
tile's logsumexp is combined with the running one by logaddexp), so a tile is built, reduced and dropped. Only the
per-row LSE [R] is saved. Backward rebuilds every tile from the saved LSE:

    p_ij      = exp(s * q_i . k_j - lse_i)            (0 on masked columns)
    A_i       = sum_j p_ij k_j                        accumulated over column tiles, (chunk, D) per row block
    dq_i      = s * g_i * (A_i - k_{t_i})
    dk_j      = s * (sum_i p_ij g_i q_i - sum_{i: t_i = j} g_i q_i)
    ds        = sum_i g_i q_i . (A_i - k_{t_i})      (= sum_ij dlogit_ij q_i . k_j, no extra pass over tiles)

Per tile that is one matmul for the logits (with -lse folded in by addmm), an in-place exp, and one matmul for each
of A and dK. The target term (-[j == t_i]) is applied once per row block with a gather and an index_add.

Memory: O(chunk^2 + chunk * D) per tile plus O((R + M) * D) for the fp32 gradient accumulators; never O(R * M).
Compute: forward one R x M x D matmul, backward three (the recomputed tile, dQ, dK), against one and two for the
materialised reference.
"""
from __future__ import annotations

import torch

from .reference import compute_dtype


class _ChunkedContrastiveCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                key_mask: torch.Tensor | None, chunk_size: int) -> torch.Tensor:
        dtype = compute_dtype(queries, keys)
        q_all, k_all = queries.to(dtype), keys.to(dtype)
        s = scale.detach().to(dtype)
        num_rows, num_cols = q_all.shape[0], k_all.shape[0]
        targets = targets.long()
        unmasked = None if key_mask is None else ~key_mask
        lse = torch.empty(num_rows, dtype=dtype, device=queries.device)
        target_logit = torch.empty(num_rows, dtype=dtype, device=queries.device)
        for r0 in range(0, num_rows, chunk_size):
            r1 = min(r0 + chunk_size, num_rows)
            q_scaled = q_all[r0:r1] * s  # (rows, D): the scale applied once per row block, not per tile
            running = torch.full((r1 - r0,), float("-inf"), dtype=dtype, device=queries.device)
            for c0 in range(0, num_cols, chunk_size):
                c1 = min(c0 + chunk_size, num_cols)
                logits = q_scaled @ k_all[c0:c1].T  # (rows, cols)
                if unmasked is not None:
                    logits.masked_fill_(unmasked[c0:c1], float("-inf"))
                running = torch.logaddexp(running, torch.logsumexp(logits, dim=1))
            lse[r0:r1] = running
            target_logit[r0:r1] = (q_scaled * k_all[targets[r0:r1]]).sum(dim=1)
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
        unmasked = None if key_mask is None else ~key_mask
        dq_all = torch.zeros_like(q_all) if need_q else None  # (R, D), fp32/fp64 accumulators
        dk_all = torch.zeros_like(k_all) if need_k else None  # (M, D)
        ds = torch.zeros((), dtype=dtype, device=queries.device)
        for r0 in range(0, num_rows, chunk_size):
            r1 = min(r0 + chunk_size, num_rows)
            q, g = q_all[r0:r1], g_all[r0:r1]
            q_scaled = q * s
            neg_lse = -lse[r0:r1, None]  # (rows, 1)
            gq = q * g[:, None]  # (rows, D)
            soft_keys = torch.zeros_like(q) if (need_q or need_s) else None  # A = P @ K, (rows, D)
            for c0 in range(0, num_cols, chunk_size):
                c1 = min(c0 + chunk_size, num_cols)
                k = k_all[c0:c1]
                p = torch.addmm(neg_lse, q_scaled, k.T)  # (rows, cols): logits - lse
                if unmasked is not None:
                    p.masked_fill_(unmasked[c0:c1], float("-inf"))
                p.exp_()  # softmax probabilities of the tile
                if soft_keys is not None:
                    soft_keys.addmm_(p, k)
                if need_k:
                    dk_all[c0:c1].addmm_(p.T, gq)
            tgt = targets[r0:r1]
            if soft_keys is not None:
                residual = soft_keys - k_all[tgt]  # (rows, D): A_i - k_{t_i}
                if need_q:
                    dq_all[r0:r1] = residual * (g * s)[:, None]
                if need_s:
                    ds += (g * (q * residual).sum(dim=1)).sum()
            if need_k:
                dk_all.index_add_(0, tgt, -gq)
        dq = dq_all.to(queries.dtype) if need_q else None
        dk = (dk_all * s).to(keys.dtype) if need_k else None
        dscale = ds.to(scale.dtype) if need_s else None
        return dq, dk, None, dscale, None, None


def contrastive_ce_chunked(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                           key_mask: torch.Tensor | None = None, chunk_size: int = 1024) -> torch.Tensor:
    """Per-row contrastive CE, tiled. Inputs as `clove_kernels.contrastive_ce` (already validated there);
    returns [R] in fp32 (fp64 for fp64 inputs)."""
    assert chunk_size > 0 and scale.dim() == 0
    return _ChunkedContrastiveCE.apply(queries, keys, targets, scale, key_mask, chunk_size)
