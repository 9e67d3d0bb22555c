"""Image-text retrieval (MS-COCO / Flickr30k style) on a set in CLIP_benchmark's webdataset layout.

    from clove_dist.eval import retrieval
    m = retrieval.evaluate(model, preprocess, tokenizer, "data/wds_mscoco_captions")
    m["text_to_image_R@1"], m["image_to_text_R@5"], m["num_images"], m["num_texts"]

Layout (what `clip_benchmark_export_wds --retrieval` writes, e.g. the published wds_mscoco_captions and
wds_flickr30k sets): data_dir/dataset_type.txt holding "retrieval", data_dir/<split>/nshards.txt and
data_dir/<split>/{0..n-1}.tar with, per image, s%07d.webp (or png/jpg/jpeg) and s%07d.txt whose lines are that
image's captions (CLIP_benchmark splits the .txt with str.splitlines; every line is a caption).

Recall@K, as CLIP_benchmark reports it (and CLIP-like papers do):
  text -> image ("image_retrieval_recall@K" there): for each caption, 1 if its own image is among the K images
    that score highest against it, else 0; averaged over all captions.
  image -> text ("text_retrieval_recall@K" there): for each image, 1 if at least one of its captions is among
    the K captions that score highest against it; averaged over all images.
Scores are cosine similarities of L2-normalised features. Ties are counted against the model: a candidate that
scores exactly as high as the best positive ranks before it (torch.topk breaks such ties arbitrarily; a model
with constant features must not get recall 1). Without ties this is exactly CLIP_benchmark's number.

An image without any caption cannot be an image -> text query: it stays a candidate for text -> image and is
counted in num_images_without_captions (CLIP_benchmark scores it as a miss). Unreadable images and their
captions are left out and counted; in strict mode more than max_missing_share of them is an error.
"""
from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from . import _check_batch_size, encode_images, encode_texts, eval_mode
from .sharding import Shard, gather_rows, sum_counts
from .wds_layout import ShardDamage, check_missing_share, dataset_type, describe_kind, image_bytes, samples, shards

RECALL_KS: tuple[int, ...] = (1, 5, 10)


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, ks: tuple[int, ...] = RECALL_KS,
                chunk: int = 1024) -> dict[int, float]:
    """{k: share of query rows whose best positive column ranks within the top k}; ties count against it.

    scores: (Q, C) query-candidate similarities; positives: (Q, C) bool, at least one True per row.
    The rank of the best positive is the number of negative candidates scoring >= it. Rows are processed
    `chunk` at a time so a 25k x 5k COCO matrix never needs a second matrix of its size.
    """
    if scores.shape != positives.shape or scores.dim() != 2:
        raise ValueError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} must be equal 2-D")
    if scores.shape[0] == 0:
        raise ValueError("recall_at_k needs at least one query")
    if not bool(positives.any(dim=1).all()):
        raise ValueError("every query needs at least one positive candidate")
    ranks = []
    for start in range(0, scores.shape[0], chunk):
        s, p = scores[start:start + chunk], positives[start:start + chunk]  # (q, C)
        best = s.masked_fill(~p, float("-inf")).max(dim=1, keepdim=True).values  # (q, 1)
        ranks.append(((s >= best) & ~p).sum(dim=1))  # (q,) negatives at or above the best positive
    rank = torch.cat(ranks)
    return {k: (rank < k).float().mean().item() for k in ks}


def _load(shard_paths: list[Path], preprocess: Callable, captions: list[list[str]],
          loaded: list[int], stats: dict[str, int], damage: ShardDamage, progress: bool, shard: Shard | None
          ) -> Iterator[torch.Tensor]:
    """Yield each readable (3, H, W) image of this rank's share; append each one's captions to
    `captions` and its sample index to `loaded`, in order."""
    for i, (_key, sample) in enumerate(tqdm(samples(shard_paths, damage), desc="retrieval images",
                                            disable=not progress)):
        if shard is not None and not shard.mine(i):
            continue
        stats["num_samples"] += 1
        data = image_bytes(sample)
        try:
            text = sample.get("txt", b"").decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if data is None or text is None:
            stats["num_skipped"] += 1
            continue
        try:
            with Image.open(io.BytesIO(data)) as img:
                tensor = preprocess(img.convert("RGB"))
        except (UnidentifiedImageError, OSError):
            stats["num_skipped"] += 1
            continue
        captions.append(text.splitlines())
        loaded.append(i)
        yield tensor


def check_directory(root: Path) -> None:
    """ValueError, naming the directory and what it is instead, unless root is a retrieval set."""
    if not root.is_dir():
        raise ValueError(f"retrieval directory not found: {root}")
    if dataset_type(root) != "retrieval":
        raise ValueError(f"{root} is not a retrieval set (no dataset_type.txt saying 'retrieval'): it is "
                         f"{describe_kind(root)}")


def evaluate(model, preprocess: Callable, tokenizer: Callable, data_dir: str | os.PathLike, *,
             device: str | torch.device = "cpu", batch_size: int = 64, split: str = "test", progress: bool = False,
             strict: bool = True, max_missing_share: float = 0.0, ks: tuple[int, ...] = RECALL_KS,
             shard: Shard | None = None) -> dict:
    """Recall@K in both directions (see the module docstring). Keys: text_to_image_R@K, image_to_text_R@K
    (fractions in [0, 1]), mean_recall (mean of all of them), num_images, num_texts,
    num_images_without_captions, num_skipped, num_damaged_shards, notes."""
    _check_batch_size(batch_size)
    root = Path(data_dir)
    check_directory(root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise ValueError(f"retrieval split directory not found: {split_dir}")
    shard_paths = shards(split_dir)
    captions: list[list[str]] = []
    loaded: list[int] = []
    stats = {"num_samples": 0, "num_skipped": 0}
    damage = ShardDamage()
    with eval_mode(model):
        image_features = encode_images(
            model, _load(shard_paths, preprocess, captions, loaded, stats, damage, progress, shard), batch_size,
            device=device)  # (I, D)
        _, image_features, captions = gather_rows(loaded, image_features, captions, shard)
        stats = sum_counts(stats, shard)
        texts = [c for caps in captions for c in caps]
        text_image = torch.tensor([i for i, caps in enumerate(captions) for _ in caps], dtype=torch.long)  # (T,)
        text_features = encode_texts(model, tokenizer, texts, device=device, batch_size=batch_size,
                                     progress=progress, desc="retrieval texts", shard=shard)  # (T, D)
    notes = []
    if damage.note():
        notes.append(damage.note())
    if stats["num_skipped"]:
        notes.append(f"{stats['num_skipped']} sample(s) skipped: no image, no readable .txt, or an unreadable image")
    check_missing_share(f"retrieval set {root}", stats["num_skipped"], stats["num_samples"], strict,
                        max_missing_share, str(split_dir))
    if not captions or not texts:
        raise ValueError(f"retrieval set {split_dir} has no usable image with a caption "
                         f"({stats['num_samples']} sample(s) read, {stats['num_skipped']} skipped)")
    num_images = len(captions)
    scores = text_features @ image_features.T  # (T, I) cosine similarities
    t2i_pos = torch.zeros_like(scores, dtype=torch.bool)
    t2i_pos[torch.arange(len(texts)), text_image] = True
    with_captions = torch.tensor([bool(c) for c in captions])  # (I,)
    num_without = int((~with_captions).sum())
    if num_without:
        notes.append(f"{num_without} image(s) without a caption: candidates for text -> image only")
    t2i = recall_at_k(scores, t2i_pos, ks)
    if num_without:  # a copy of the matrix without those rows; otherwise the transposed views suffice
        i2t = recall_at_k(scores.T[with_captions], t2i_pos.T[with_captions], ks)
    else:
        i2t = recall_at_k(scores.T, t2i_pos.T, ks)
    result: dict = {f"text_to_image_R@{k}": t2i[k] for k in ks}
    result.update({f"image_to_text_R@{k}": i2t[k] for k in ks})
    result["mean_recall"] = (sum(t2i.values()) + sum(i2t.values())) / (2 * len(ks))
    result.update({"num_images": num_images, "num_texts": len(texts), "num_images_without_captions": num_without,
                   "num_skipped": stats["num_skipped"], "num_damaged_shards": len(damage.shards), "notes": notes})
    return result


__all__ = ["evaluate", "recall_at_k", "check_directory", "RECALL_KS"]
