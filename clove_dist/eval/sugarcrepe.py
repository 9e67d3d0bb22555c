"""SugarCrepe (Hsieh et al., 2023): does the model score the true caption above a minimally changed false one?

    from clove_dist.eval import sugarcrepe
    m = sugarcrepe.evaluate(model, preprocess, tokenizer, "sugar-crepe/data", image_dir="coco/val2017")
    m["average"], m["replace"], m["swap_att"], m["counts"]["swap_att"]

Reads the benchmark's own format: a directory with up to seven files replace_obj.json, replace_att.json,
replace_rel.json, swap_obj.json, swap_att.json, add_obj.json, add_att.json (early releases named the object
subsets *_ent.json; those names are read too), each {"0": {"filename", "caption", "negative_caption"}, ...},
and an image directory (default data_dir/images; COCO val2017 for the real benchmark).

Rule, as in the official evaluation: an example is correct only if the image-text cosine similarity of the
caption is STRICTLY higher than that of the negative; a tie counts as wrong. Unlike the official loop (one image
and two texts per forward pass), every unique image and every unique text is encoded once, in batches.

Result: each subset's accuracy (fraction in [0, 1]) under its own name, the group means "replace" (obj, att,
rel), "swap" (obj, att) and "add" (obj, att), "average" (mean of the subsets present), "counts" per subset
(num_examples, num_evaluated, num_correct, num_missing_images, num_malformed), "missing_subsets" and "notes".
A subset whose file is absent is skipped with a note; a directory with none of them is a ValueError. An entry
whose image is missing or unreadable is counted and skipped, as is an entry lacking one of the three fields; in
strict mode (the default) more than max_missing_share of the unique images missing is a ValueError instead.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from . import _check_batch_size, encode_images, encode_texts, eval_mode
from .sharding import Shard, gather_rows
from .wds_layout import check_missing_share, describe_kind

SUBSETS: tuple[str, ...] = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj",
                            "add_att")
GROUPS: dict[str, tuple[str, ...]] = {"replace": ("replace_obj", "replace_att", "replace_rel"),
                                      "swap": ("swap_obj", "swap_att"), "add": ("add_obj", "add_att")}
_OLD_NAMES = {"replace_obj": "replace_ent", "swap_obj": "swap_ent", "add_obj": "add_ent"}
_FIELDS = ("filename", "caption", "negative_caption")


def _subset_file(data_dir: Path, subset: str) -> Path | None:
    for stem in (subset, _OLD_NAMES.get(subset)):
        if stem and (data_dir / f"{stem}.json").is_file():
            return data_dir / f"{stem}.json"
    return None


def load(data_dir: str | os.PathLike) -> tuple[dict[str, list[tuple[str, str, str]]], dict[str, int], list[str]]:
    """Read the subset files: ({subset: [(filename, caption, negative)]}, {subset: num_malformed}, missing subsets).

    ValueError when data_dir is not a directory, holds no subset file, or a file is not a JSON object.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"SugarCrepe directory not found: {root}")
    examples: dict[str, list[tuple[str, str, str]]] = {}
    malformed: dict[str, int] = {}
    missing = []
    for subset in SUBSETS:
        path = _subset_file(root, subset)
        if path is None:
            missing.append(subset)
            continue
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"SugarCrepe file {path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"SugarCrepe file {path} must hold a JSON object {{\"0\": {{...}}, ...}}, "
                             f"got {type(raw).__name__}")
        rows, bad = [], 0
        for entry in raw.values():
            if isinstance(entry, dict) and all(isinstance(entry.get(f), str) and entry.get(f) for f in _FIELDS):
                rows.append((entry["filename"], entry["caption"], entry["negative_caption"]))
            else:
                bad += 1
        examples[subset], malformed[subset] = rows, bad
    if not examples:
        raise ValueError(f"no SugarCrepe subset file ({', '.join(s + '.json' for s in SUBSETS)}) in {root}: it is "
                         f"{describe_kind(root)}")
    return examples, malformed, missing


def _images(names: list[str], image_dir: Path, preprocess: Callable, loaded: list[int],
            progress: bool, shard: Shard | None) -> Iterator[torch.Tensor]:
    """Yield each readable (3, H, W) image of this rank's share, appending its index."""
    for i, name in enumerate(tqdm(names, desc="sugarcrepe images", disable=not progress)):
        if shard is not None and not shard.mine(i):
            continue
        path = image_dir / name
        try:
            with Image.open(path) as img:
                tensor = preprocess(img.convert("RGB"))
        except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError, OSError):
            continue
        loaded.append(i)
        yield tensor


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate(model, preprocess: Callable, tokenizer: Callable, data_dir: str | os.PathLike, *,
             image_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu", batch_size: int = 64,
             progress: bool = False, return_scores: bool = False, strict: bool = True,
             max_missing_share: float = 0.0, shard: Shard | None = None) -> dict:
    """SugarCrepe accuracies of `model` (see the module docstring for the result's keys).

    return_scores adds "scores": {subset: {"positive": [...], "negative": [...]}} (cosine similarities of the
    evaluated examples, in file order).
    """
    _check_batch_size(batch_size)
    examples, malformed, missing = load(data_dir)
    images_root = Path(image_dir) if image_dir else Path(data_dir) / "images"
    if not images_root.is_dir():
        raise ValueError(f"SugarCrepe image directory not found: {images_root}")
    notes = [f"subset {s} skipped: no {s}.json in {data_dir}" for s in missing]

    unique_images = sorted({name for rows in examples.values() for name, _, _ in rows})
    loaded: list[int] = []
    with eval_mode(model):
        image_features = encode_images(
            model, _images(unique_images, images_root, preprocess, loaded, progress, shard), batch_size,
            device=device)  # (num_loaded, D)
        loaded, image_features, _ = gather_rows(loaded, image_features, [None] * len(loaded), shard)
        image_index = {unique_images[j]: i for i, j in enumerate(loaded)}
        check_missing_share(f"SugarCrepe set {data_dir}", len(unique_images) - len(loaded), len(unique_images),
                            strict, max_missing_share, str(images_root))
        texts = sorted({t for rows in examples.values() for name, pos, neg in rows if name in image_index
                        for t in (pos, neg)})
        text_features = encode_texts(model, tokenizer, texts, device=device, batch_size=batch_size,
                                     progress=progress, desc="sugarcrepe texts", shard=shard)  # (num_texts, D)
    text_index = {t: i for i, t in enumerate(texts)}

    result: dict = {}
    counts: dict[str, dict[str, int]] = {}
    scores: dict[str, dict[str, list[float]]] = {}
    for subset, rows in examples.items():
        usable = [(image_index[n], text_index[p], text_index[q]) for n, p, q in rows if n in image_index]
        num_missing = len(rows) - len(usable)
        if usable:
            idx = torch.tensor(usable)  # (E, 3): image, positive, negative
            img = image_features[idx[:, 0]]
            # The same elementwise product-and-sum for both captions, so identical texts tie exactly.
            pos = (img * text_features[idx[:, 1]]).sum(-1)
            neg = (img * text_features[idx[:, 2]]).sum(-1)
            num_correct = int((pos > neg).sum())
            result[subset] = num_correct / len(usable)
            scores[subset] = {"positive": pos.tolist(), "negative": neg.tolist()}
        else:
            num_correct = 0
            result[subset] = None
            scores[subset] = {"positive": [], "negative": []}
            notes.append(f"subset {subset}: no example could be evaluated")
        if num_missing:
            notes.append(f"subset {subset}: {num_missing} example(s) skipped, image missing or unreadable "
                         f"under {images_root}")
        if malformed[subset]:
            notes.append(f"subset {subset}: {malformed[subset]} malformed entr(y/ies) skipped")
        counts[subset] = {"num_examples": len(rows) + malformed[subset], "num_evaluated": len(usable),
                          "num_correct": num_correct, "num_missing_images": num_missing,
                          "num_malformed": malformed[subset]}

    accuracies = {s: result[s] for s in SUBSETS if result.get(s) is not None}
    for group, members in GROUPS.items():
        result[group] = _mean([accuracies[s] for s in members if s in accuracies])
    result["average"] = _mean(list(accuracies.values()))
    result["counts"] = counts
    result["missing_subsets"] = missing
    result["notes"] = notes
    if return_scores:
        result["scores"] = scores
    return result


__all__ = ["evaluate", "load", "SUBSETS", "GROUPS"]
