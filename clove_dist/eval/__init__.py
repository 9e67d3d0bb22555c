"""Evaluation of CLIP-like models: SugarCrepe and ARO (compositionality), zero-shot classification, retrieval.

    from clove_dist.eval import evaluate_all
    metrics = evaluate_all(model, preprocess, tokenizer, sugarcrepe_dir="data/world/sugarcrepe",
                           zeroshot_dir="data/world/zeroshot", retrieval_dir="data/world/retrieval",
                           aro_dir="data/world/aro", device="cpu", batch_size=64)

During training, `clove_dist.eval.in_training.evaluate_during_training` runs the same on the current weights.

Model-agnostic: `model` only needs `encode_image(images)` and `encode_text(tokens)` (an open_clip CLIP has both);
`preprocess` maps a PIL image to a (3, H, W) tensor, `tokenizer` a list of strings to a (N, L) tensor. Features
are L2-normalised here, in fp32, before any similarity. The model is put in eval mode for the duration and its
previous mode restored. The shared encoders below are public so other evaluators batch the same way.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """no_grad + model.eval(), restoring the model's training flag afterwards."""
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training and hasattr(model, "train"):
            model.train(True)


def model_dtype(model) -> torch.dtype:
    """The floating dtype images are cast to: the model's first floating parameter, else fp32."""
    if hasattr(model, "parameters"):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def encode_texts(model, tokenizer: Callable, texts: Sequence[str], *, device: str | torch.device = "cpu",
                 batch_size: int = 64, progress: bool = False, desc: str = "texts", shard=None) -> torch.Tensor:
    """(N, D) fp32 L2-normalised text features on the CPU, encoded batch_size texts at a time.

    shard (eval.sharding.Shard): this rank encodes texts i with i % world_size == rank; all rows are gathered.
    """
    _check_batch_size(batch_size)
    from .sharding import active, gather_rows
    if active(shard):
        mine = [i for i in range(len(texts)) if shard.mine(i)]
        local = encode_texts(model, tokenizer, [texts[i] for i in mine], device=device, batch_size=batch_size,
                             progress=progress, desc=desc)
        return gather_rows(mine, local, [None] * len(mine), shard)[1]
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress):
        tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


def encode_images(model, images: Iterable[torch.Tensor], batch_size: int, *, device: str | torch.device = "cpu"
                  ) -> torch.Tensor:
    """(N, D) fp32 L2-normalised image features on the CPU from an iterable of (3, H, W) images, encoded
    batch_size at a time (the loaders only decide which images, in which order)."""
    dtype = model_dtype(model)
    chunks, batch = [], []
    for image in images:
        batch.append(image)
        if len(batch) == batch_size:
            chunks.append(_encode_image_batch(model, torch.stack(batch), device, dtype))
            batch = []
    if batch:
        chunks.append(_encode_image_batch(model, torch.stack(batch), device, dtype))
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


def _encode_image_batch(model, batch: torch.Tensor, device, dtype) -> torch.Tensor:  # (B, 3, H, W) -> (B, D)
    return F.normalize(model.encode_image(batch.to(device=device, dtype=dtype)).float(), dim=-1).cpu()


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def evaluate_all(model, preprocess: Callable, tokenizer: Callable, *, sugarcrepe_dir: str = "",
                 sugarcrepe_image_dir: str = "", zeroshot_dir: str = "", retrieval_dir: str = "", aro_dir: str = "",
                 aro_coco_root: str = "", aro_flickr_root: str = "", device: str | torch.device = "cpu",
                 batch_size: int = 64, progress: bool = False, strict: bool = True, max_missing_share: float = 0.0,
                 seed: int = 0, shard=None) -> dict:
    """Run every evaluation whose directory is given; {"sugarcrepe", "zeroshot", "retrieval", "aro"} (given ones).

    sugarcrepe_image_dir: where the SugarCrepe images are ("" = sugarcrepe_dir/images; for the real benchmark,
    COCO val2017). aro_coco_root / aro_flickr_root: image roots of COCO-Order / Flickr30k-Order ("" = aro_dir).
    strict / max_missing_share: fail, instead of scoring a subset, when more than that share of a set's images
    is missing or unreadable. seed: the ARO order perturbations. shard (eval.sharding.Shard, e.g.
    Shard.current()): every rank encodes its share of the images and texts and returns the same full result.
    """
    from . import aro, retrieval, sugarcrepe, zeroshot  # here, not at the top: they import the encoders above

    common = dict(device=device, batch_size=batch_size, progress=progress, strict=strict,
                  max_missing_share=max_missing_share, shard=shard)
    results: dict = {}
    if sugarcrepe_dir:
        results["sugarcrepe"] = sugarcrepe.evaluate(model, preprocess, tokenizer, sugarcrepe_dir,
                                                    image_dir=sugarcrepe_image_dir or None, **common)
    if zeroshot_dir:
        results["zeroshot"] = zeroshot.evaluate(model, preprocess, tokenizer, zeroshot_dir, **common)
    if retrieval_dir:
        results["retrieval"] = retrieval.evaluate(model, preprocess, tokenizer, retrieval_dir, **common)
    if aro_dir:
        results["aro"] = aro.evaluate(model, preprocess, tokenizer, aro_dir, coco_root=aro_coco_root or None,
                                      flickr_root=aro_flickr_root or None, seed=seed, **common)
    return results


def headline_metrics(results: dict) -> dict[str, float]:
    """The few numbers worth a curve, flat and prefixed for a metrics log: eval/sugarcrepe_average,
    eval/zeroshot_top1, eval/retrieval_t2i_R@1 ..., eval/aro_vg_relation ... (None values left out)."""
    flat: dict[str, float | None] = {}
    if "sugarcrepe" in results:
        sc = results["sugarcrepe"]
        flat.update({f"eval/sugarcrepe_{k}": sc.get(k) for k in ("average", "replace", "swap", "add")})
    if "zeroshot" in results:
        flat["eval/zeroshot_top1"] = results["zeroshot"].get("top1")
        flat["eval/zeroshot_top5"] = results["zeroshot"].get("top5")
    if "retrieval" in results:
        r = results["retrieval"]
        for k in (1, 5, 10):
            flat[f"eval/retrieval_t2i_R@{k}"] = r.get(f"text_to_image_R@{k}")
            flat[f"eval/retrieval_i2t_R@{k}"] = r.get(f"image_to_text_R@{k}")
    if "aro" in results:
        a = results["aro"]
        for s in ("vg_relation", "vg_attribution"):
            if s in a:
                flat[f"eval/aro_{s}"] = a[s].get("macro_accuracy")
        for s in ("coco_order", "flickr30k_order"):
            if s in a:
                flat[f"eval/aro_{s}"] = a[s].get("accuracy")
    return {k: float(v) for k, v in flat.items() if v is not None}


__all__ = ["evaluate_all", "headline_metrics", "encode_texts", "encode_images", "eval_mode", "model_dtype"]
