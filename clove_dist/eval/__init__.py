"""Evaluation of CLIP-like models: SugarCrepe (compositionality) and zero-shot classification.

    from clove_dist.eval import evaluate_all
    metrics = evaluate_all(model, preprocess, tokenizer, sugarcrepe_dir="data/world/sugarcrepe",
                           zeroshot_dir="data/world/zeroshot", device="cpu", batch_size=64)

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
                 batch_size: int = 64, progress: bool = False, desc: str = "texts") -> torch.Tensor:
    """(N, D) fp32 L2-normalised text features on the CPU, encoded batch_size texts at a time."""
    _check_batch_size(batch_size)
    chunks = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress):
        tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


def encode_image_batches(model, batches: Iterable[torch.Tensor], *, device: str | torch.device = "cpu"
                         ) -> torch.Tensor:
    """(N, D) fp32 L2-normalised image features on the CPU from an iterable of (B, 3, H, W) batches."""
    dtype = model_dtype(model)
    chunks = [F.normalize(model.encode_image(b.to(device=device, dtype=dtype)).float(), dim=-1).cpu()
              for b in batches]
    if not chunks:
        return torch.empty(0, 0)
    return torch.cat(chunks)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def evaluate_all(model, preprocess: Callable, tokenizer: Callable, *, sugarcrepe_dir: str = "",
                 sugarcrepe_image_dir: str = "", zeroshot_dir: str = "", device: str | torch.device = "cpu",
                 batch_size: int = 64, progress: bool = False) -> dict:
    """Run every evaluation whose directory is given; {"sugarcrepe": {...}, "zeroshot": {...}} (given ones only).

    sugarcrepe_image_dir: where the SugarCrepe images are ("" = sugarcrepe_dir/images; for the real benchmark,
    COCO val2017).
    """
    from . import sugarcrepe, zeroshot  # here, not at the top: both import the encoders above

    results: dict = {}
    if sugarcrepe_dir:
        results["sugarcrepe"] = sugarcrepe.evaluate(model, preprocess, tokenizer, sugarcrepe_dir,
                                                    image_dir=sugarcrepe_image_dir or None, device=device,
                                                    batch_size=batch_size, progress=progress)
    if zeroshot_dir:
        results["zeroshot"] = zeroshot.evaluate(model, preprocess, tokenizer, zeroshot_dir, device=device,
                                                batch_size=batch_size, progress=progress)
    return results


__all__ = ["evaluate_all", "encode_texts", "encode_image_batches", "eval_mode", "model_dtype"]
