"""clove_kernels: the contrastive cross-entropy primitive under clove-dist's loss.

    import clove_kernels
    loss = clove_kernels.contrastive_ce(queries, keys, targets, scale, key_mask=None, impl="auto")  # [R] fp32

    loss_i = logsumexp_j(scale * q_i . k_j  over valid j) - scale * q_i . k_{targets[i]}

Implementations (all give exact gradients for queries, keys and scale):
  reference  materialises the (R, M) logits; the oracle for tests and benchmarks
  chunked    pure torch, tiles of rows x columns, online log-sum-exp, O(R * chunk) extra memory
  triton     fused Triton kernels (CUDA, or CPU when TRITON_INTERPRET=1 is set before triton is imported)
  auto       triton for CUDA tensors when triton imports, chunked otherwise

Triton is imported lazily, on the first call that wants it, so importing this package never fixes triton's
interpreter mode.
"""
from __future__ import annotations

import warnings

import torch

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
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """Per-row contrastive cross-entropy without (for chunked/triton) materialising the logits.

    queries [R, D] and keys [M, D] (fp16, bf16, fp32 or fp64, one dtype, one device), targets [R] int64 in
    [0, M), scale a 0-dim tensor (may require grad), key_mask [M] bool with True = valid column (a target column
    must be valid). Returns the per-row loss [R] in fp32 (fp64 for fp64 inputs). ValueError on bad inputs.
    """
    scale = check_inputs(queries, keys, targets, scale, key_mask)
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


__all__ = ["contrastive_ce", "contrastive_ce_reference", "resolve_impl", "triton_unavailable_reason", "IMPLS",
           "DEFAULT_CHUNK_SIZE"]
