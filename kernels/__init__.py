"""clove_kernels: the contrastive cross-entropy primitive under clove-dist's loss.

    import clove_kernels
    loss = clove_kernels.contrastive_ce(queries, keys, targets, scale, key_mask=None, impl="auto")  # [R] fp32

    loss_i = logsumexp_j(scale * q_i . k_j  over valid j) - scale * q_i . k_{targets[i]}

Implementations (all give exact gradients for queries, keys and scale):
  reference  materialises the (R, M) logits; the oracle for tests and benchmarks
  chunked    pure torch, tiles of rows x columns, online log-sum-exp, O(R * chunk) extra memory
  triton     fused Triton kernels (CUDA, or CPU when TRITON_INTERPRET=1 is set before triton is imported)
  auto       triton for CUDA tensors when triton imports, chunked otherwise

The block API (kernels/block.py) computes one row block of the logits for both directions at once, with partial
column statistics out and the full column LSE in: what a rank needs when every rank owns its image rows.

    stats = clove_kernels.contrastive_block_forward(queries, keys, targets, scale, key_mask, num_col_stats)
    dq, dk, dscale = clove_kernels.contrastive_block_backward(queries, keys, targets, scale, stats.row_lse,
                                                              col_lse, grad_row_lse, grad_col_lse, grad_target)

Triton is imported lazily, on the first call that wants it, so importing this package never fixes triton's
interpreter mode.
"""
from __future__ import annotations

import warnings

import torch

from .block import (BlockStats, block_backward_chunked, block_backward_reference, block_forward_chunked,
                    block_forward_reference)
from .reference import check_inputs, contrastive_ce_reference

IMPLS = ("auto", "triton", "chunked", "reference")
DEFAULT_CHUNK_SIZE = 1024

_fallback_announced = False


def _is_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _announce_fallback(reason: str) -> None:
    """Warn once per process (and only on rank 0 under torch.distributed) that triton is not used."""
    global _fallback_announced
    if _fallback_announced:
        return
    _fallback_announced = True
    if _is_rank_zero():
        warnings.warn(f"WARNING: Triton contrastive loss unavailable ({reason}), using the chunked torch loss",
                      RuntimeWarning, stacklevel=4)


def triton_unavailable_reason(device: torch.device) -> str | None:
    """None when the triton implementation can run on tensors of this device, else why not."""
    try:
        from . import contrastive
    except Exception as e:  # any import failure (missing package, broken driver) means: not available
        return f"triton import failed: {type(e).__name__}: {e}"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        # The interpreter needs the variable both when the kernels were defined and while they run.
        if contrastive.INTERPRETED and contrastive.interpreter_active():
            return None
        return "CPU tensors need TRITON_INTERPRET=1 set before triton is imported"
    return f"device {device} is not supported"


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation a call with `impl` on `device` actually runs (announcing a triton fallback once)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl in ("chunked", "reference"):
        return impl
    if impl == "auto" and device.type != "cuda":
        return "chunked"
    reason = triton_unavailable_reason(device)
    if reason is None:
        return "triton"
    _announce_fallback(reason)
    return "chunked"


def contrastive_ce(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor,
                   scale: torch.Tensor | float, key_mask: torch.Tensor | None = None, impl: str = "auto",
                   chunk_size: int = DEFAULT_CHUNK_SIZE, validate: bool = True) -> torch.Tensor:
    """Per-row contrastive cross-entropy without (for chunked/triton) materialising the logits.

    queries [R, D] and keys [M, D] (fp16, bf16, fp32 or fp64, one dtype, one device), targets [R] int64 in
    [0, M), scale a 0-dim tensor (may require grad), key_mask [M] bool with True = valid column (a target column
    must be valid). Returns the per-row loss [R] in fp32 (fp64 for fp64 inputs). ValueError on bad inputs.
    validate=False skips the checks of target values, which read them back from the device (a host sync): for
    callers that built the targets and mask themselves.
    """
    scale = check_inputs(queries, keys, targets, scale, key_mask, check_values=validate)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chosen = resolve_impl(impl, queries.device)
    if chosen == "reference":
        return contrastive_ce_reference(queries, keys, targets, scale, key_mask)
    if chosen == "chunked":
        from .chunked import contrastive_ce_chunked
        return contrastive_ce_chunked(queries, keys, targets, scale, key_mask, chunk_size=chunk_size)
    from .contrastive import contrastive_ce_triton
    return contrastive_ce_triton(queries, keys, targets, scale, key_mask)


BLOCK_IMPLS = IMPLS


def _block_impl(impl: str, device: torch.device) -> str:
    if impl not in BLOCK_IMPLS:
        raise ValueError(f"block impl must be one of {', '.join(BLOCK_IMPLS)}, got {impl!r}")
    return resolve_impl(impl, device)


def _check_block(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | float,
                 key_mask: torch.Tensor | None, num_col_stats: int) -> torch.Tensor:
    scale = check_inputs(queries, keys, targets, scale, key_mask)
    if not isinstance(num_col_stats, int) or not 0 <= num_col_stats <= keys.shape[0]:
        raise ValueError(f"num_col_stats must be an integer in [0, M={keys.shape[0]}], got {num_col_stats!r}")
    if key_mask is not None and num_col_stats and not bool(key_mask[:num_col_stats].all()):
        raise ValueError(f"the first num_col_stats={num_col_stats} columns carry column statistics and must be valid")
    return scale


def contrastive_block_forward(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor,
                              scale: torch.Tensor | float, key_mask: torch.Tensor | None = None,
                              num_col_stats: int = 0, impl: str = "auto",
                              chunk_size: int = DEFAULT_CHUNK_SIZE, allow_tf32: bool = True) -> BlockStats:
    """Statistics of the block S = scale * queries @ keys.T without autograd (see kernels/block.py).

    queries [R, D], keys [M, D], targets [R] (row i's positive column), key_mask [M] bool (True = valid).
    Returns BlockStats(row_lse [R], target_logit [R], col_lse [num_col_stats]) in fp32 (fp64 for fp64 inputs);
    col_lse is partial: the log-sum-exp over this block's rows only, for the first num_col_stats columns.
    allow_tf32: fp32 inputs may use TF32 tensor-core dots (triton on GPU only).
    """
    scale = _check_block(queries, keys, targets, scale, key_mask, num_col_stats)
    return block_forward(queries, keys, targets, scale, key_mask, num_col_stats,
                         _block_impl(impl, queries.device), chunk_size, allow_tf32)


def block_forward(queries, keys, targets, scale, key_mask, num_col_stats, impl, chunk_size=DEFAULT_CHUNK_SIZE,
                  allow_tf32=True) -> BlockStats:
    """contrastive_block_forward without checks, for a resolved impl (chunked | reference | triton)."""
    if impl == "reference":
        return block_forward_reference(queries, keys, targets, scale, key_mask, num_col_stats)
    if impl == "triton":
        from .block_triton import block_forward_triton
        return block_forward_triton(queries, keys, targets, scale, key_mask, num_col_stats, allow_tf32)
    return block_forward_chunked(queries, keys, targets, scale, key_mask, num_col_stats, chunk_size)


def block_backward(queries, keys, targets, scale, key_mask, row_lse, col_lse, grad_row_lse, grad_col_lse,
                   grad_target, impl, chunk_size=DEFAULT_CHUNK_SIZE, need_q=True, need_k=True, allow_tf32=True,
                   deterministic=False):
    """contrastive_block_backward without checks, for a resolved impl (chunked | reference | triton)."""
    args = (queries, keys, targets, scale, key_mask, row_lse, col_lse, grad_row_lse, grad_col_lse, grad_target)
    if impl == "reference":
        return block_backward_reference(*args, need_q=need_q, need_k=need_k)
    if impl == "triton":
        from .block_triton import block_backward_triton
        return block_backward_triton(*args, need_q=need_q, need_k=need_k, allow_tf32=allow_tf32,
                                     deterministic=deterministic)
    return block_backward_chunked(*args, chunk_size, need_q=need_q, need_k=need_k)


def contrastive_block_backward(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor,
                               scale: torch.Tensor | float, row_lse: torch.Tensor, col_lse: torch.Tensor,
                               grad_row_lse: torch.Tensor, grad_col_lse: torch.Tensor, grad_target: torch.Tensor,
                               key_mask: torch.Tensor | None = None, impl: str = "auto",
                               chunk_size: int = DEFAULT_CHUNK_SIZE, allow_tf32: bool = True,
                               deterministic: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dqueries, dkeys in the input dtype, dscale) of a loss whose gradients with respect to the
    block's row_lse [R], the full (all-blocks) col_lse [C] and target_logit [R] are the grad_* arguments.
    col_lse is the combined column LSE, not this block's partial one.
    deterministic: triton only; True runs two backward kernels without atomics (same bits for the same autotuned
    configuration), False one fused kernel whose dkeys, summed with atomic adds, may differ run to run in the last
    bits."""
    num_col_stats = col_lse.shape[0] if isinstance(col_lse, torch.Tensor) else -1
    scale = _check_block(queries, keys, targets, scale, key_mask, num_col_stats)
    num_rows = queries.shape[0]
    for name, t, n in (("row_lse", row_lse, num_rows), ("grad_row_lse", grad_row_lse, num_rows),
                       ("grad_target", grad_target, num_rows), ("grad_col_lse", grad_col_lse, num_col_stats)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n,):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must have shape ({n},), got {shape}")
    return block_backward(queries, keys, targets, scale, key_mask, row_lse, col_lse, grad_row_lse, grad_col_lse,
                          grad_target, _block_impl(impl, queries.device), chunk_size, allow_tf32=allow_tf32,
                          deterministic=deterministic)


__all__ = ["contrastive_ce", "contrastive_block_forward", "contrastive_block_backward", "BlockStats", "BLOCK_IMPLS",
           "contrastive_ce_reference", "resolve_impl", "triton_unavailable_reason", "IMPLS", "DEFAULT_CHUNK_SIZE"]
