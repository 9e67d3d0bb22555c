"""ContrastiveLoss: CLIP's symmetric contrastive loss with hard-negative text columns, across ranks.

    loss_fn = ContrastiveLoss(impl="auto", max_logit_scale=100.0, chunk_size=1024)
    loss = loss_fn(image_features, text_features, model.logit_scale, negative_features, negative_mask)

Per rank r, with local I_r [B, D], T_r [B, D], N_r [n_r, D] (L2-normalised) and s = min(exp(logit_scale), 100):

- I_all, T_all, N_all are gathered across ranks in rank order, with gradient. Negative counts may differ between
  ranks: each rank pads to the largest count and the padding is masked out of the softmax (it adds no exp(0) term).
- image -> text: each local image is a row over the columns [T_all ; N_all]; its target is its own positive text.
- text -> image: each local positive text is a row over I_all; its target is its own image. Negatives are never rows.
- loss_r = (mean_i CE_i2t + mean_j CE_t2i) / 2.

Gradients. The gather's backward sums the feature gradients of all ranks and keeps this rank's slice, so after the
engine averages parameter gradients over ranks they equal the gradients of mean_r loss_r, i.e. of a single process
on the concatenated batch. logit_scale is used only locally (never gathered, never all-reduced), so the engine's
averaging counts it exactly once. With one rank and no negatives this equals open_clip's ClipLoss.

This module imports only torch and clove_kernels: no DeepSpeed, data or training code.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import clove_kernels


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 (equal shapes on every rank); backward sums the gradients of all ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        ctx.rank = dist.get_rank(group)
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)  # (world * rows, D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            out = torch.empty((ctx.rows,) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
            return out, None
        # gloo has no reduce-scatter: all-reduce the whole gradient and keep this rank's slice.
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows].clone(), None


def gather_with_grad(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenate x [rows, ...] from every rank in rank order, differentiably (equal rows on every rank)."""
    return _GatherWithGrad.apply(x, group)


def _world(group: Any) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


class ContrastiveLoss(nn.Module):
    """Symmetric image/text contrastive loss with extra negative text columns; see the module docstring."""

    def __init__(self, impl: str = "auto", max_logit_scale: float = 100.0, chunk_size: int = 1024,
                 group: Any = None) -> None:
        super().__init__()
        if impl not in clove_kernels.IMPLS:
            raise ValueError(f"loss impl must be one of {', '.join(clove_kernels.IMPLS)}, got {impl!r}")
        if not max_logit_scale > 0:
            raise ValueError(f"max_logit_scale must be > 0, got {max_logit_scale!r}")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.impl = impl
        self.max_logit_scale = float(max_logit_scale)
        self.chunk_size = chunk_size
        self.group = group

    @classmethod
    def from_config(cls, cfg: Any, group: Any = None) -> "ContrastiveLoss":
        """Build from the `loss` config section (impl, max_logit_scale, chunk_size)."""
        return cls(impl=cfg.impl, max_logit_scale=cfg.max_logit_scale, chunk_size=cfg.chunk_size, group=group)

    def _check(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: Any,
               negative_features: torch.Tensor | None, negative_mask: torch.Tensor | None) -> None:
        if image_features.dim() != 2 or image_features.shape != text_features.shape:
            raise ValueError(f"image_features and text_features must both be [B, D], got "
                             f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
        if image_features.shape[0] == 0:
            raise ValueError("the batch is empty (B=0)")
        if image_features.dtype != text_features.dtype:
            raise ValueError(f"image_features and text_features must share a dtype, got {image_features.dtype} "
                             f"and {text_features.dtype}")
        if isinstance(logit_scale, torch.Tensor) and logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must hold one value (shape [] or [1]), got shape "
                             f"{tuple(logit_scale.shape)}")
        if negative_features is None:
            if negative_mask is not None:
                raise ValueError("negative_mask was given without negative_features")
            return
        dim = image_features.shape[1]
        if negative_features.dim() != 2 or negative_features.shape[1] != dim:
            raise ValueError(f"negative_features must be [n, D={dim}], got {tuple(negative_features.shape)}")
        if negative_mask is not None and (negative_mask.dtype != torch.bool or negative_mask.dim() != 1
                                          or negative_mask.shape[0] != negative_features.shape[0]):
            raise ValueError(f"negative_mask must be a bool tensor of shape [{negative_features.shape[0]}], got "
                             f"{negative_mask.dtype} of shape {tuple(negative_mask.shape)}")

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: Any,
                negative_features: torch.Tensor | None = None,
                negative_mask: torch.Tensor | None = None) -> torch.Tensor:
        """image_features, text_features [B, D]; logit_scale: the raw log-space parameter ([] or [1]);
        negative_features [n, D] (n may be 0 and may differ between ranks); negative_mask [n] bool
        (True = valid). Returns the scalar loss of this rank (fp32)."""
        self._check(image_features, text_features, logit_scale, negative_features, negative_mask)
        device, dtype = image_features.device, image_features.dtype
        batch = image_features.shape[0]
        if not isinstance(logit_scale, torch.Tensor):
            logit_scale = torch.tensor(float(logit_scale), device=device)
        # exp in fp32 at least: a bf16 logit_scale (mixed-precision engines) would otherwise round s by ~0.4%.
        scale_dtype = torch.float64 if logit_scale.dtype == torch.float64 else torch.float32
        scale = logit_scale.reshape(()).to(scale_dtype).exp().clamp(max=self.max_logit_scale)
        if negative_features is not None:
            negative_features = negative_features.to(dtype)
            if negative_mask is None:
                negative_mask = torch.ones(negative_features.shape[0], dtype=torch.bool, device=device)
        rank, world = _world(self.group)

        if world > 1:
            images_all, texts_all, negatives_all, negatives_mask_all = self._gather(
                image_features, text_features, negative_features, negative_mask, batch, world)
        else:
            images_all, texts_all = image_features, text_features
            negatives_all, negatives_mask_all = negative_features, negative_mask

        targets = torch.arange(batch, device=device) + rank * batch
        if negatives_all is not None and negatives_all.shape[0] > 0:
            columns = torch.cat([texts_all, negatives_all], dim=0)  # (world*B + n_all, D)
            column_mask = torch.cat([torch.ones(texts_all.shape[0], dtype=torch.bool, device=device),
                                     negatives_mask_all])
            if bool(column_mask.all()):
                column_mask = None
        else:
            columns, column_mask = texts_all, None
        loss_i2t = clove_kernels.contrastive_ce(image_features, columns, targets, scale, key_mask=column_mask,
                                                impl=self.impl, chunk_size=self.chunk_size)
        loss_t2i = clove_kernels.contrastive_ce(text_features, images_all, targets, scale,
                                                impl=self.impl, chunk_size=self.chunk_size)
        return (loss_i2t.mean() + loss_t2i.mean()).float() / 2

    def _gather(self, image_features: torch.Tensor, text_features: torch.Tensor,
                negative_features: torch.Tensor | None, negative_mask: torch.Tensor | None, batch: int,
                world: int):
        device = image_features.device
        num_neg = 0 if negative_features is None else negative_features.shape[0]
        counts = torch.tensor([batch, num_neg], dtype=torch.int64, device=device)
        all_counts = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(all_counts, counts, group=self.group)
        batches = [int(c[0]) for c in all_counts]
        if len(set(batches)) != 1:
            raise ValueError(f"every rank must have the same batch size, got {batches} (rank order)")
        max_neg = max(int(c[1]) for c in all_counts)

        # Local rows use the local tensors directly; the gathered copies are the columns. The gather's backward
        # adds every rank's column gradient to the local row gradient, which is what the global loss needs.
        images_all = gather_with_grad(image_features, self.group)
        texts_all = gather_with_grad(text_features, self.group)
        if max_neg == 0:
            return images_all, texts_all, None, None
        dim = image_features.shape[1]
        if negative_features is None:
            negative_features = image_features.new_zeros((0, dim))
            negative_mask = torch.zeros(0, dtype=torch.bool, device=device)
        pad = max_neg - num_neg
        if pad:
            # Padded rows are masked below, so their value never reaches the softmax.
            negative_features = torch.cat([negative_features, negative_features.new_zeros((pad, dim))])
            negative_mask = torch.cat([negative_mask, torch.zeros(pad, dtype=torch.bool, device=device)])
        negatives_all = gather_with_grad(negative_features, self.group)  # (world * max_neg, D)
        mask_u8 = negative_mask.to(torch.uint8)  # not every backend gathers bool tensors
        mask_parts = [torch.empty_like(mask_u8) for _ in range(world)]
        dist.all_gather(mask_parts, mask_u8, group=self.group)
        return images_all, texts_all, negatives_all, torch.cat(mask_parts).bool()
