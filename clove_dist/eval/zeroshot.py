"""Zero-shot image classification on a dataset in CLIP_benchmark's webdataset layout.

    from clove_dist.eval import zeroshot
    m = zeroshot.evaluate(model, preprocess, tokenizer, "data/world/zeroshot")
    m["top1"], m["top5"], m["mean_per_class_recall"], m["per_class"]["red circle"]

Layout (what CLIP_benchmark's `clip_benchmark_export_wds` writes):

    data_dir/classnames.txt                            one class name per line, label i = line i (blank and
                                                       repeated lines keep their index, as in CLIP_benchmark)
    data_dir/zeroshot_classification_templates.txt     one prompt per line with {c} for the class name
    data_dir/<split>/nshards.txt                       number of shards n
    data_dir/<split>/{0..n-1}.tar                      {key}.webp | .png | .jpg | .jpeg  and  {key}.cls (label)

The classifier is CLIP's: each class's prompts are encoded and L2-normalised, averaged, and the mean normalised
again; an image's prediction ranks the classes by cosine similarity. Without nshards.txt every *.tar of the
split is read (numeric order); without a templates file "a photo of a {c}." is used, with a note.

Result: top1, top5 (only with >= 5 classes), mean_per_class_recall (the mean over classes that have examples, as
CLIP_benchmark reports), per_class accuracy by class name (None for a class without examples), num_classes,
num_templates, num_examples, num_skipped (samples without an image or a valid label, or with an unreadable
image), num_damaged_shards (shards that broke off; read up to the damage, never fatal) and notes. In strict mode
more than max_missing_share of skipped samples is an error. A retrieval set (dataset_type.txt) is rejected with
one line saying so.
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
from .wds_layout import (IMAGE_EXTENSIONS, ShardDamage, check_missing_share, dataset_type, describe_kind, image_bytes,
                         samples, shards)

DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {c}.",)


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_classnames(path: Path) -> list[str]:
    """CLIP_benchmark's reading: every line, stripped, is the class of its line number. A blank line and a repeated
    name keep their label index (dropping them would shift every later label onto the wrong class)."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def _images(shard_paths: list[Path], preprocess: Callable, num_classes: int,
            labels: list[int], loaded: list[int], counts: dict[str, int], damage: ShardDamage,
            progress: bool, shard: Shard | None) -> Iterator[torch.Tensor]:
    for i, (_key, sample) in enumerate(tqdm(samples(shard_paths, damage), desc="zeroshot images",
                                            disable=not progress)):
        if shard is not None and not shard.mine(i):
            continue
        counts["num_samples"] += 1
        data = image_bytes(sample)
        try:
            label = int(sample.get("cls", b"").decode().strip())
        except (ValueError, UnicodeDecodeError):
            label = -1
        if data is None or not 0 <= label < num_classes:
            counts["num_skipped"] += 1
            continue
        try:
            with Image.open(io.BytesIO(data)) as img:
                tensor = preprocess(img.convert("RGB"))
        except (UnidentifiedImageError, OSError):
            counts["num_skipped"] += 1
            continue
        labels.append(label)
        loaded.append(i)
        yield tensor


def classifier(model, tokenizer: Callable, classnames: list[str], templates: list[str] | tuple[str, ...], *,
               device: str | torch.device = "cpu", batch_size: int = 64, progress: bool = False,
               shard: Shard | None = None) -> torch.Tensor:
    """(C, D) class embeddings: per class, the normalised mean of the normalised template embeddings."""
    texts = [t.replace("{c}", name) for name in classnames for t in templates]
    feats = encode_texts(model, tokenizer, texts, device=device, batch_size=batch_size, progress=progress,
                         desc="zeroshot classes", shard=shard)  # (C * T, D)
    mean = feats.view(len(classnames), len(templates), -1).mean(dim=1)  # (C, D)
    return torch.nn.functional.normalize(mean, dim=-1)


def _per_class_names(classnames: list[str]) -> list[str]:
    """Result keys for per_class: the class name, or "name [label i]" for a blank or repeated name."""
    seen: set[str] = set()
    keys = []
    for i, name in enumerate(classnames):
        keys.append(f"{name} [label {i}]".lstrip() if not name or name in seen else name)
        seen.add(name)
    return keys


def evaluate(model, preprocess: Callable, tokenizer: Callable, data_dir: str | os.PathLike, *,
             device: str | torch.device = "cpu", batch_size: int = 64, split: str = "test",
             progress: bool = False, strict: bool = True, max_missing_share: float = 0.0,
             shard: Shard | None = None) -> dict:
    """Zero-shot accuracy of `model` on a CLIP_benchmark webdataset directory (see the module docstring)."""
    _check_batch_size(batch_size)
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"zero-shot directory not found: {root}")
    kind = dataset_type(root)
    if kind != "classification" or not (root / "classnames.txt").is_file():
        raise ValueError(f"{root} is not a zero-shot classification set (it needs classnames.txt and no "
                         f"dataset_type.txt other than classification): it is {describe_kind(root)}")
    classnames = read_classnames(root / "classnames.txt")
    if not any(classnames):
        raise ValueError(f"{root / 'classnames.txt'} lists no class")
    notes = []
    if len(set(classnames)) < len(classnames) or not all(classnames):
        notes.append(f"{root / 'classnames.txt'} has blank or repeated lines; each keeps its label index")
    templates_file = root / "zeroshot_classification_templates.txt"
    if templates_file.is_file():
        templates = _read_lines(templates_file)
        for t in templates:
            if "{c}" not in t:
                raise ValueError(f"template {t!r} in {templates_file} has no {{c}} placeholder for the class name")
        if not templates:
            raise ValueError(f"{templates_file} lists no template")
    else:
        templates = list(DEFAULT_TEMPLATES)
        notes.append(f"no {templates_file.name} in {root}; used {DEFAULT_TEMPLATES[0]!r}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise ValueError(f"zero-shot split directory not found: {split_dir}")
    shard_paths = shards(split_dir)

    labels: list[int] = []
    loaded: list[int] = []
    counts = {"num_samples": 0, "num_skipped": 0}
    damage = ShardDamage()
    with eval_mode(model):
        weights = classifier(model, tokenizer, classnames, templates, device=device, batch_size=batch_size,
                             progress=progress, shard=shard)  # (C, D)
        feats = encode_images(
            model, _images(shard_paths, preprocess, len(classnames), labels, loaded, counts, damage, progress, shard),
            batch_size, device=device)  # (N, D)
    _, feats, labels = gather_rows(loaded, feats, labels, shard)
    counts = sum_counts(counts, shard)
    if damage.note():
        notes.append(damage.note())
    if counts["num_skipped"]:
        notes.append(f"{counts['num_skipped']} sample(s) skipped: no image, no valid label, or an unreadable image")
    check_missing_share(f"zero-shot set {root}", counts["num_skipped"], counts["num_samples"], strict,
                        max_missing_share, str(split_dir))
    result: dict = {"num_classes": len(classnames), "num_templates": len(templates), "num_examples": len(labels),
                    "num_skipped": counts["num_skipped"], "num_damaged_shards": len(damage.shards), "notes": notes}
    if not labels:
        raise ValueError(f"no usable sample in {split_dir} ({counts['num_skipped']} skipped, "
                         f"{len(damage.shards)} damaged shard(s))")
    target = torch.tensor(labels)  # (N,)
    logits = feats @ weights.T  # (N, C) cosine similarities
    k = min(5, len(classnames))
    topk = logits.topk(k, dim=1).indices  # (N, k) best first
    hit1 = topk[:, 0] == target
    result["top1"] = hit1.float().mean().item()
    if len(classnames) >= 5:
        result["top5"] = (topk == target[:, None]).any(dim=1).float().mean().item()
    per_class = {}
    for c, name in enumerate(_per_class_names(classnames)):
        mask = target == c
        per_class[name] = hit1[mask].float().mean().item() if mask.any() else None
    present = [v for v in per_class.values() if v is not None]
    result["mean_per_class_recall"] = sum(present) / len(present)
    result["per_class"] = per_class
    return result


__all__ = ["evaluate", "classifier", "read_classnames", "IMAGE_EXTENSIONS", "DEFAULT_TEMPLATES"]
