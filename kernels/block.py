"""One block of the contrastive logits, both directions from the same tiles: the block API.

A rank owns the row block S = s * Q K^T of the global logits (Q its local images [R, D], K every text and
negative column [M, D]). From S alone it gets

    row_lse_i   = logsumexp_j S_ij over valid j              (image -> text, complete: every column is here)
    target_i    = S_{i, t_i}                                 (the positive pair's logit)
    col_lse_j   = logsumexp_i S_ij,  j < num_col_stats       (text -> image, PARTIAL: only this block's rows)

The caller combines the partial column LSE across blocks (ranks) into the full column LSE and hands it back for
the backward ("partial statistics out, external LSE in"). Backward takes the gradient of the caller's loss with
respect to row_lse (a [R]), the full col_lse (b [num_col_stats]) and target (c [R]):

    dS_ij = a_i exp(S_ij - row_lse_i) [j valid] + b_j exp(S_ij - col_lse_j) [j < num_col_stats] + c_i [j == t_i]
    dQ = s dS K,   dK = s dS^T Q,   ds = sum_ij dS_ij (q_i . k_j) = sum_i q_i . (dS K)_i

so one recompute of S and two products, on the same tiles for both directions. Rows and their targets are a
one-to-one pairing (row i with column t_i), as in CLIP; stat columns must be valid (they are the positive texts).

Implementations: `chunked` (pure torch, tiles of chunk x chunk, never the whole block) and `reference`
(materialises S; the oracle). Both compute in fp32 (fp64 for fp64 inputs) and return gradients in the input dtype.
Memory of `chunked`: O(chunk^2) per tile plus fp32 copies of Q, K and their gradients: O((R + M) D).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .reference import compute_dtype


class BlockStats(NamedTuple):
    row_lse: torch.Tensor  # [R]
    target_logit: torch.Tensor  # [R]
    col_lse: torch.Tensor  # [num_col_stats], partial over this block's rows


def _column_bias(key_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """0 for valid, -inf for masked columns, [1, M]: added by addmm, so masking costs no pass over a tile."""
    if key_mask is None:
        return None
    bias = torch.zeros((1, key_mask.shape[0]), dtype=dtype, device=key_mask.device)
    return bias.masked_fill_(~key_mask[None, :], float("-inf"))


def _tile(q_scaled: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return q_scaled @ k.T
    return torch.addmm(bias, q_scaled, k.T)


@torch.no_grad()
def block_forward_chunked(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                          key_mask: torch.Tensor | None, num_col_stats: int, chunk_size: int) -> BlockStats:
    dtype = compute_dtype(queries, keys)
    q_all, k_all = queries.to(dtype), keys.to(dtype)
    s = scale.detach().to(dtype)
    num_rows, num_cols = q_all.shape[0], k_all.shape[0]
    device = queries.device
    bias = _column_bias(key_mask, dtype)
    targets = targets.long()
    row_lse = torch.empty(num_rows, dtype=dtype, device=device)
    target_logit = torch.empty(num_rows, dtype=dtype, device=device)
    col_lse = torch.full((num_col_stats,), float("-inf"), dtype=dtype, device=device)
    # On CPU one exp pass per tile serves both directions: exp(S - tile max), summed along rows and columns. When
    # a row or column of the tile then sums below 1e-30 (its terms lie ~69 below the tile max and would lose
    # precision in fp32) the tile is redone with exact per-row / per-column log-sum-exp. Reading that condition
    # on the host is free on CPU; elsewhere the exact form always runs.
    shared_exp = device.type == "cpu"
    for r0 in range(0, num_rows, chunk_size):
        r1 = min(r0 + chunk_size, num_rows)
        q_scaled = q_all[r0:r1] * s  # (rows, D)
        running = torch.full((r1 - r0,), float("-inf"), dtype=dtype, device=device)
        for c0 in range(0, num_cols, chunk_size):
            c1 = min(c0 + chunk_size, num_cols)
            logits = _tile(q_scaled, k_all[c0:c1], None if bias is None else bias[:, c0:c1])  # (rows, cols)
            cs = max(0, min(c1, num_col_stats) - c0)  # stat columns in this tile
            if shared_exp:
                peak = logits.max()
                if bool(torch.isfinite(peak)):
                    e = torch.sub(logits, peak).exp_()
                    row_sum, col_sum = e.sum(dim=1), e[:, :cs].sum(dim=0)
                    if bool(row_sum.min() >= 1e-30) and (cs == 0 or bool(col_sum.min() >= 1e-30)):
                        running = torch.logaddexp(running, row_sum.log_().add_(peak))
                        if cs:
                            col_lse[c0:c0 + cs] = torch.logaddexp(col_lse[c0:c0 + cs], col_sum.log_().add_(peak))
                        continue
            running = torch.logaddexp(running, torch.logsumexp(logits, dim=1))
            if cs:
                col_lse[c0:c0 + cs] = torch.logaddexp(col_lse[c0:c0 + cs], torch.logsumexp(logits[:, :cs], dim=0))
        row_lse[r0:r1] = running
        target_logit[r0:r1] = (q_scaled * k_all[targets[r0:r1]]).sum(dim=1)
    return BlockStats(row_lse, target_logit, col_lse)


@torch.no_grad()
def block_backward_chunked(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                           key_mask: torch.Tensor | None, row_lse: torch.Tensor, col_lse: torch.Tensor,
                           grad_row_lse: torch.Tensor, grad_col_lse: torch.Tensor, grad_target: torch.Tensor,
                           chunk_size: int, need_q: bool = True, need_k: bool = True
                           ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    dtype = compute_dtype(queries, keys)
    q_all, k_all = queries.to(dtype), keys.to(dtype)
    s = scale.detach().to(dtype)
    num_rows, num_cols = q_all.shape[0], k_all.shape[0]
    num_col_stats = col_lse.shape[0]
    bias = _column_bias(key_mask, dtype)
    targets = targets.long()
    a_all, b_all, c_all = grad_row_lse.to(dtype), grad_col_lse.to(dtype), grad_target.to(dtype)
    neg_col_lse = -col_lse.to(dtype)
    dq_all = torch.empty_like(q_all) if need_q else None  # (R, D)
    dk_all = torch.zeros_like(k_all) if need_k else None  # (M, D), unscaled until the end
    ds = torch.zeros((), dtype=dtype, device=queries.device)
    # Positive weights (any loss whose upstream gradient is > 0) fold into the exponents:
    # a_i exp(S - r_i) = exp(S + log a_i - r_i), and the row term is added by the tile's matmul itself.
    # Checked on the host, so only on CPU (free there); elsewhere the weights multiply the tiles.
    fold = queries.device.type == "cpu" and bool((a_all > 0).all()) and bool((b_all >= 0).all())
    if fold:
        row_bias_all = a_all.log() - row_lse.to(dtype)  # [R]
        col_bias_all = b_all.log() + neg_col_lse  # [C]
    for r0 in range(0, num_rows, chunk_size):
        r1 = min(r0 + chunk_size, num_rows)
        q = q_all[r0:r1]
        q_scaled = q * s
        soft_keys = torch.zeros_like(q)  # dS @ K for this row block, (rows, D)
        if fold:
            row_bias = row_bias_all[r0:r1, None]  # (rows, 1)
        else:
            neg_row_lse = -row_lse[r0:r1, None].to(dtype)  # (rows, 1)
            a = a_all[r0:r1, None]
        for c0 in range(0, num_cols, chunk_size):
            c1 = min(c0 + chunk_size, num_cols)
            k = k_all[c0:c1]
            cs = max(0, min(c1, num_col_stats) - c0)
            if fold:
                dlogits = torch.addmm(row_bias, q_scaled, k.T)  # (rows, cols): S + log a - row_lse
                if bias is not None:
                    dlogits.add_(bias[:, c0:c1])  # -inf on masked columns
                col = None
                if cs:
                    col = torch.sub(dlogits[:, :cs], row_bias).add_(col_bias_all[None, c0:c0 + cs]).exp_()
                dlogits.exp_()
                if col is not None:
                    dlogits[:, :cs].add_(col)
            else:
                logits = _tile(q_scaled, k, None if bias is None else bias[:, c0:c1])  # (rows, cols)
                dlogits = torch.add(logits, neg_row_lse).exp_().mul_(a)  # a_i * row softmax; 0 on masked
                if cs:
                    col = logits[:, :cs].add_(neg_col_lse[None, c0:c0 + cs]).exp_()  # column softmax, in place
                    dlogits[:, :cs].addcmul_(col, b_all[None, c0:c0 + cs])
            soft_keys.addmm_(dlogits, k)
            if need_k:
                dk_all[c0:c1].addmm_(dlogits.T, q)
        tgt = targets[r0:r1]
        c = c_all[r0:r1, None]
        soft_keys.addcmul_(k_all[tgt], c)  # the target term c_i [j == t_i]
        if need_k:
            dk_all.index_add_(0, tgt, q * c)
        if need_q:
            dq_all[r0:r1] = soft_keys * s
        ds += (q * soft_keys).sum()
    dq = dq_all.to(queries.dtype) if need_q else None
    dk = (dk_all * s).to(keys.dtype) if need_k else None
    return dq, dk, ds


def block_logits_reference(queries: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor,
                           key_mask: torch.Tensor | None) -> torch.Tensor:
    """The whole block S = s Q K^T (masked columns -inf), in the compute dtype."""
    dtype = compute_dtype(queries, keys)
    logits = (queries.to(dtype) @ keys.to(dtype).T) * scale.to(dtype)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[None, :], float("-inf"))
    return logits


@torch.no_grad()
def block_forward_reference(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                            key_mask: torch.Tensor | None, num_col_stats: int) -> BlockStats:
    logits = block_logits_reference(queries, keys, scale, key_mask)  # (R, M)
    rows = torch.arange(logits.shape[0], device=logits.device)
    return BlockStats(torch.logsumexp(logits, dim=1), logits[rows, targets.long()],
                      torch.logsumexp(logits[:, :num_col_stats], dim=0))


@torch.no_grad()
def block_backward_reference(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                             key_mask: torch.Tensor | None, row_lse: torch.Tensor, col_lse: torch.Tensor,
                             grad_row_lse: torch.Tensor, grad_col_lse: torch.Tensor, grad_target: torch.Tensor,
                             need_q: bool = True, need_k: bool = True
                             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    logits = block_logits_reference(queries, keys, scale, key_mask)
    dtype = logits.dtype
    n = col_lse.shape[0]
    dlogits = grad_row_lse.to(dtype)[:, None] * torch.exp(logits - row_lse.to(dtype)[:, None])
    dlogits[:, :n] += grad_col_lse.to(dtype)[None, :] * torch.exp(logits[:, :n] - col_lse.to(dtype)[None, :])
    rows = torch.arange(logits.shape[0], device=logits.device)
    dlogits[rows, targets.long()] += grad_target.to(dtype)
    q, k, s = queries.to(dtype), keys.to(dtype), scale.to(dtype)
    dq = (s * dlogits @ k).to(queries.dtype) if need_q else None
    dk = (s * dlogits.T @ q).to(keys.dtype) if need_k else None
    ds = (dlogits * (q @ k.T)).sum()
    return dq, dk, ds
