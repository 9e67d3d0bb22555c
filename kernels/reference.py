"""Input checks shared by every implementation, and the materialised-logits oracle.

    loss_i = logsumexp_j(scale * q_i . k_j  over valid j) - scale * q_i . k_{targets[i]}

`contrastive_ce_reference` builds the whole (R, M) logits matrix and hands it to F.cross_entropy, letting autograd
differentiate it. It is the oracle the tiled implementations are tested and benchmarked against, and it is what
`impl="reference"` runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(queries: torch.Tensor, keys: torch.Tensor) -> torch.dtype:
    """fp64 when the inputs are fp64 (tests want the oracle exact), fp32 for everything else."""
    if queries.dtype == torch.float64 or keys.dtype == torch.float64:
        return torch.float64
    return torch.float32


def check_inputs(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | float,
                 key_mask: torch.Tensor | None, check_values: bool = True) -> torch.Tensor:
    """Validate shapes, dtypes and devices; return `scale` as a 0-dim tensor on the queries' device.

    Raises ValueError naming the offending values. The range checks on `targets` read their min and max, which
    synchronises with the device; check_values=False skips them (shapes, dtypes and devices are still checked).
    """
    if not isinstance(queries, torch.Tensor) or not isinstance(keys, torch.Tensor):
        raise ValueError(f"queries and keys must be tensors, got {type(queries).__name__} and {type(keys).__name__}")
    if queries.dim() != 2 or keys.dim() != 2:
        raise ValueError(f"queries must be [R, D] and keys [M, D], got shapes {tuple(queries.shape)} and "
                         f"{tuple(keys.shape)}")
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"feature dimension mismatch: queries have D={queries.shape[1]}, keys D={keys.shape[1]}")
    if queries.dtype not in FLOAT_DTYPES or keys.dtype not in FLOAT_DTYPES:
        raise ValueError(f"queries and keys must be floating point (fp16, bf16, fp32, fp64), got {queries.dtype} "
                         f"and {keys.dtype}")
    if queries.dtype != keys.dtype:
        raise ValueError(f"queries and keys must share a dtype, got {queries.dtype} and {keys.dtype}")
    if queries.device != keys.device:
        raise ValueError(f"queries and keys must be on one device, got {queries.device} and {keys.device}")
    num_rows, num_cols = queries.shape[0], keys.shape[0]
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.shape[0] != num_rows:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be a 1-d tensor of length R={num_rows}, got {shape}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 (or int32), got {targets.dtype}")
    if targets.device != queries.device:
        raise ValueError(f"targets must be on {queries.device}, got {targets.device}")
    if num_rows > 0 and num_cols == 0:
        raise ValueError(f"keys are empty (M=0) but there are R={num_rows} rows to score")
    if num_rows > 0 and check_values:
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= num_cols:
            raise ValueError(f"targets must lie in [0, {num_cols}), got values from {lo} to {hi}")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool or key_mask.dim() != 1:
            desc = (f"{key_mask.dtype} tensor of shape {tuple(key_mask.shape)}" if isinstance(key_mask, torch.Tensor)
                    else type(key_mask).__name__)
            raise ValueError(f"key_mask must be a 1-d bool tensor, got {desc}")
        if key_mask.shape[0] != num_cols:
            raise ValueError(f"key_mask has {key_mask.shape[0]} entries but there are M={num_cols} keys")
        if key_mask.device != queries.device:
            raise ValueError(f"key_mask must be on {queries.device}, got {key_mask.device}")
        if num_rows > 0 and check_values:
            masked_targets = ~key_mask[targets.long()]
            if bool(masked_targets.any()):
                row = int(masked_targets.nonzero()[0, 0])
                raise ValueError(f"target column {int(targets[row])} of row {row} is masked out by key_mask")
    if not isinstance(scale, torch.Tensor):
        try:
            scale = torch.tensor(float(scale))
        except (TypeError, ValueError):
            raise ValueError(f"scale must be a number or a 0-dim tensor, got {scale!r}") from None
    if scale.numel() != 1:
        raise ValueError(f"scale must be a 0-dim tensor, got shape {tuple(scale.shape)}")
    if not scale.dtype.is_floating_point:
        scale = scale.float()
    return scale.reshape(()).to(queries.device)


def contrastive_ce_reference(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                             key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row cross-entropy of scale * queries @ keys.T, computed on the full logits matrix.

    queries [R, D], keys [M, D], targets [R], scale 0-dim, key_mask [M] bool (True = valid column).
    Returns [R] in fp32 (fp64 for fp64 inputs). Memory O(R * M): the logits, their log-softmax and its gradient.
    """
    dtype = compute_dtype(queries, keys)
    # The scale is folded into the queries so that only one (R, M) tensor is alive before the cross-entropy.
    logits = (queries.to(dtype) * scale.to(dtype)) @ keys.to(dtype).T  # (R, M)
    if key_mask is not None:
        logits.masked_fill_(~key_mask, float("-inf"))  # in place: the matmul does not save its output
    return F.cross_entropy(logits, targets.long(), reduction="none")
