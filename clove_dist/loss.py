"""ContrastiveLoss: CLIP's symmetric contrastive loss with hard-negative text columns, across ranks.

    loss_fn = ContrastiveLoss(impl="auto", max_logit_scale=100.0, chunk_size=1024)
    loss = loss_fn(image_features, text_features, model.logit_scale, negative_features, negative_mask)

Per rank r, with local I_r [B, D], T_r [B, D], N_r [n_r, D] (L2-normalised; fp32, bf16 or fp16) and
s = min(exp(logit_scale), 100):

- T_all and N_all are gathered across ranks in rank order, with gradient, in ONE gather of [T_r; N_r]. Negative
  counts may differ between ranks: each rank pads to the largest count (a rank with None or 0 negatives sends only
  padding) and the padding is masked out of the softmax (it adds no exp(0) term).
- image -> text: each local image is a row over the columns [T_all ; N_all]; its target is its own positive text.
- text -> image: each positive text is a column over all ranks' images; its target is its own image. Negatives
  are never rows.
- loss_r = (mean_i CE_i2t + mean_j CE_t2i) / 2, over this rank's images and texts.

How (impl chunked or triton; DESIGN.md "one block per rank"): rank r computes only S_r = s I_r [T_all; N_all]^T.
Its rows give the image -> text LSE; the same tiles give every text column's partial LSE over I_r, combined across
ranks by two all-reduces of one float per text (max, then the rescaled sum). Images are never gathered. Backward:
rank r forms the gradient of sum_q loss_q with respect to its block (column terms weighted by each text owner's
upstream gradient, all-gathered: one float per rank) and the gather's backward reduce-scatters the text/negative
gradients to their owners. impl="reference" keeps the plain two-direction form on materialised logits (images
gathered): it is the oracle.

Collectives: every rank issues the same ones in forward and backward whatever its negatives: one all_gather of
(batch, count, valid count) -- the only device -> host read of a multi-rank call --, the [T; N] gather, the mask
gather when some negative is masked, the two statistic all-reduces; in backward the upstream-gradient all_gather
and the gather's reduce-scatter. A single-process call reads one value (whether the mask is all valid).

Gradients. After the engine averages parameter gradients over ranks they equal the gradients of mean_r loss_r,
i.e. of a single process on the concatenated batch. logit_scale is used only locally (never gathered, never
all-reduced), so the engine's averaging counts it exactly once. With one rank and no negatives this equals
open_clip's ClipLoss.

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
                 group: Any = None, allow_tf32: bool = True, deterministic: bool = False) -> None:
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
        self.allow_tf32 = bool(allow_tf32)  # fp32 features may use TF32 tensor-core dots (Triton on GPU)
        # Triton backward without atomics (two kernels, same bits for a given autotuned config), not the fused one
        self.deterministic = bool(deterministic)
        # This rank's image->text and text->image losses of the last call (detached tensors, read without a
        # host sync until someone logs them): {"i2t": ..., "t2i": ...}
        self.last_directions: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg: Any, group: Any = None) -> "ContrastiveLoss":
        """Build from the `loss` config section (impl, max_logit_scale, chunk_size, allow_tf32, deterministic)."""
        return cls(impl=cfg.impl, max_logit_scale=cfg.max_logit_scale, chunk_size=cfg.chunk_size, group=group,
                   allow_tf32=cfg.allow_tf32, deterministic=cfg.deterministic)

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
        """image_features, text_features [B, D] (fp32, bf16 or fp16); logit_scale: the raw log-space parameter
        ([] or [1]); negative_features [n, D] or None (n may be 0 and may differ between ranks); negative_mask [n]
        bool (True = valid). Returns the scalar loss of this rank (fp32).

        Every rank issues the same collectives whatever its negatives: one all_gather of the counts (the only
        device -> host sync of the call), one gather of [texts; negatives] and one of the negative mask, and in
        the block path two small all-reduces of the column statistics; backward mirrors them."""
        self._check(image_features, text_features, logit_scale, negative_features, negative_mask)
        device, dtype = image_features.device, image_features.dtype
        batch, dim = image_features.shape
        if not isinstance(logit_scale, torch.Tensor):
            logit_scale = torch.tensor(float(logit_scale), device=device)
        # exp in fp32 at least: a bf16 logit_scale (mixed-precision engines) would otherwise round s by ~0.4%.
        scale_dtype = torch.float64 if logit_scale.dtype == torch.float64 else torch.float32
        scale = logit_scale.reshape(()).to(scale_dtype).exp().clamp(max=self.max_logit_scale)
        if negative_features is None:
            # A rank without negatives still takes part in every gather (with zero rows of its own).
            negative_features = image_features.new_zeros((0, dim))
            negative_mask = torch.zeros(0, dtype=torch.bool, device=device)
        else:
            negative_features = negative_features.to(dtype)
            if negative_mask is None:
                negative_mask = torch.ones(negative_features.shape[0], dtype=torch.bool, device=device)
        rank, world = _world(self.group)
        texts_all, negatives_all, negatives_mask_all = self._gather_columns(
            text_features, negative_features, negative_mask, batch, rank, world)
        num_texts = texts_all.shape[0]
        if negatives_all.shape[0] > 0:
            columns = torch.cat([texts_all, negatives_all], dim=0)  # (world*B + n_all, D)
            column_mask = None if negatives_mask_all is None else torch.cat(
                [torch.ones(num_texts, dtype=torch.bool, device=device), negatives_mask_all])
        else:
            columns, column_mask = texts_all, None
        offset = rank * batch
        impl = clove_kernels.resolve_impl(self.impl, device)
        if impl != "reference":
            return _BlockContrastiveLoss.apply(image_features, columns, scale, column_mask, num_texts, offset,
                                               (impl, self.chunk_size, self.allow_tf32, self.deterministic),
                                               self.group, world, self.last_directions)
        # The reference: two independent directions on materialised logits, images gathered. The oracle.
        images_all = gather_with_grad(image_features, self.group) if world > 1 else image_features
        targets = torch.arange(batch, device=device) + offset
        loss_i2t = clove_kernels.contrastive_ce(image_features, columns, targets, scale, key_mask=column_mask,
                                                impl=self.impl, chunk_size=self.chunk_size, validate=False)
        loss_t2i = clove_kernels.contrastive_ce(text_features, images_all, targets, scale,
                                                impl=self.impl, chunk_size=self.chunk_size, validate=False)
        self.last_directions.update(i2t=loss_i2t.detach().mean().float(), t2i=loss_t2i.detach().mean().float())
        return (loss_i2t.mean() + loss_t2i.mean()).float() / 2

    def _gather_columns(self, text_features: torch.Tensor, negative_features: torch.Tensor,
                        negative_mask: torch.Tensor, batch: int, rank: int, world: int):
        """T_all [world*B, D], N_all [world*max_n, D] (padding masked) and its mask (None when every gathered
        negative is valid), in rank order. One counts collective and one host sync, then one feature gather."""
        if world == 1:
            # The one host read of a single-process call: an all-valid mask is dropped, so no tile pays for it.
            all_valid = negative_mask.shape[0] == 0 or bool(negative_mask.all())
            return text_features, negative_features, None if all_valid else negative_mask
        device = text_features.device
        num_neg = negative_features.shape[0]
        counts = torch.stack([torch.tensor(batch, device=device), torch.tensor(num_neg, device=device),
                              negative_mask.sum().to(device=device, dtype=torch.int64)])
        all_counts = [torch.empty_like(counts) for _ in range(world)]
        dist.all_gather(all_counts, counts, group=self.group)
        table = torch.stack(all_counts).tolist()  # the one device -> host sync of the call
        batches = [row[0] for row in table]
        if len(set(batches)) != 1:
            raise ValueError(f"every rank must have the same batch size, got {batches} (rank order)")
        max_neg = max(row[1] for row in table)
        all_valid = sum(row[2] for row in table) == world * max_neg
        dim = text_features.shape[1]
        pad = max_neg - num_neg
        if pad:
            # Padded rows are masked below, so their value never reaches the softmax.
            negative_features = torch.cat([negative_features, negative_features.new_zeros((pad, dim))])
            negative_mask = torch.cat([negative_mask, torch.zeros(pad, dtype=torch.bool, device=device)])
        # Texts and negatives travel in one gather, so its backward (the reduce-scatter of their gradients) runs
        # on every rank, also on one whose negatives are zero rows that need no gradient.
        local = torch.cat([text_features, negative_features]) if max_neg else text_features
        gathered = gather_with_grad(local, self.group).view(world, batch + max_neg, dim)
        texts_all = gathered[:, :batch].reshape(world * batch, dim)
        negatives_all = gathered[:, batch:].reshape(world * max_neg, dim)
        if max_neg == 0 or all_valid:
            return texts_all, negatives_all, None
        mask_u8 = negative_mask.to(torch.uint8)  # not every backend gathers bool tensors
        mask_parts = [torch.empty_like(mask_u8) for _ in range(world)]
        dist.all_gather(mask_parts, mask_u8, group=self.group)
        return texts_all, negatives_all, torch.cat(mask_parts).bool()


def _all_reduce_lse(partial: torch.Tensor, group: Any) -> torch.Tensor:
    """log sum_r exp(partial_r) elementwise over ranks: a MAX then a SUM all-reduce (1 float per column each)."""
    peak = partial.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # a column with no rows anywhere
    total = torch.exp(partial - peak)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return peak + torch.log(total)


class _BlockContrastiveLoss(torch.autograd.Function):
    """loss_r from this rank's block S_r = s I_r [T_all; N_all]^T only (DESIGN.md, one block per rank).

    Forward: row LSE (image -> text) and target logits are local; the partial column LSE of every text is
    all-reduced into the text -> image LSE. Backward: this rank computes the gradient of sum_q loss_q with
    respect to its block (row terms weighted by its own upstream gradient, column terms by the text owner's,
    all-gathered: one float per rank), so after the gather's reduce-scatter and the engine's averaging every
    gradient equals that of the mean loss. Images are never gathered."""

    @staticmethod
    def forward(ctx, images: torch.Tensor, columns: torch.Tensor, scale: torch.Tensor,
                column_mask: torch.Tensor | None, num_texts: int, offset: int, kernel: tuple, group: Any,
                world: int, directions: dict) -> torch.Tensor:
        batch = images.shape[0]
        impl, chunk_size, allow_tf32, _ = kernel
        targets = torch.arange(batch, device=images.device) + offset
        stats = clove_kernels.block_forward(images, columns, targets, scale, column_mask, num_texts, impl,
                                            chunk_size, allow_tf32)
        col_lse = _all_reduce_lse(stats.col_lse, group) if world > 1 else stats.col_lse
        own_col_lse = col_lse[offset:offset + batch]
        target = stats.target_logit.mean()
        directions.update(i2t=(stats.row_lse.mean() - target).detach().float(),
                          t2i=(own_col_lse.mean() - target).detach().float())
        loss = (stats.row_lse.mean() + own_col_lse.mean()) / 2 - target
        ctx.save_for_backward(images, columns, scale, column_mask, targets, stats.row_lse, col_lse)
        ctx.meta = (kernel, group, world)
        return loss.float()  # the training loss is fp32 whatever the feature dtype

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        images, columns, scale, column_mask, targets, row_lse, col_lse = ctx.saved_tensors
        (impl, chunk_size, allow_tf32, deterministic), group, world = ctx.meta
        need_images, need_columns, need_scale = ctx.needs_input_grad[:3]
        batch = images.shape[0]
        g = grad_loss.detach().to(row_lse.dtype).reshape(1)
        if world > 1:
            parts = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(parts, g.contiguous(), group=group)  # every text owner's upstream gradient
            g_all = torch.cat(parts)
        else:
            g_all = g
        weight = 1.0 / (2 * batch)
        grad_row = (g * weight).expand(batch)
        grad_col = (g_all * weight).repeat_interleave(batch)  # [world * B]: text j weighted by its owner
        grad_target = (g * (-2 * weight)).expand(batch)
        d_images, d_columns, d_scale = clove_kernels.block_backward(
            images, columns, targets, scale, column_mask, row_lse, col_lse, grad_row, grad_col, grad_target, impl,
            chunk_size, need_q=need_images, need_k=need_columns, allow_tf32=allow_tf32, deterministic=deterministic)
        d_scale = d_scale.to(scale.dtype) if need_scale else None
        return d_images, d_columns, d_scale, None, None, None, None, None, None, None
