"""Zero-shot image classification on a dataset in CLIP_benchmark's webdataset layout.

    from clove_dist.eval import zeroshot
    m = zeroshot.evaluate(model, preprocess, tokenizer, "data/world/zeroshot")
    m["top1"], m["top5"], m["mean_per_class_recall"], m["per_class"]["red circle"]

Layout (what CLIP_benchmark's `clip_benchmark_export_wds` writes):

    data_dir/classnames.txt                            one class name per line, label i = line i
    data_dir/zeroshot_classification_templates.txt     one prompt per line with {c} for the class name
    data_dir/<split>/nshards.txt                       number of shards n
    data_dir/<split>/{0..n-1}.tar                      {key}.webp | .png | .jpg | .jpeg  and  {key}.cls (label)

The classifier is CLIP's: each class's prompts are encoded and L2-normalised, averaged, and the mean normalised
again; an image's prediction ranks the classes by cosine similarity. Without nshards.txt every *.tar of the
split is read (numeric order); without a templates file "a photo of a {c}." is used, with a note.

Result: top1, top5 (only with >= 5 classes), mean_per_class_recall (the mean over classes that have examples, as
CLIP_benchmark reports), per_class accuracy by class name (None for a class without examples), num_classes,
num_templates, num_examples, num_skipped (samples without an image or a valid label, or with an unreadable
image) and notes.
"""
from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from . import _check_batch_size, encode_image_batches, encode_texts, eval_mode

IMAGE_EXTENSIONS: tuple[str, ...] = ("webp", "png", "jpg", "jpeg")
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of a {c}.",)


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _shards(split_dir: Path) -> list[Path]:
    nshards_file = split_dir / "nshards.txt"
    if nshards_file.is_file():
        text = nshards_file.read_text().strip()
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{nshards_file} must hold a positive shard count, got {text!r}")
        shards = [split_dir / f"{i}.tar" for i in range(int(text))]
        absent = [str(s) for s in shards if not s.is_file()]
        if absent:
            raise ValueError(f"{nshards_file} lists {text} shards but {absent[0]} does not exist")
        return shards
    shards = sorted(split_dir.glob("*.tar"), key=lambda p: (int(p.stem) if p.stem.isdigit() else 1 << 62, p.name))
    if not shards:
        raise ValueError(f"no nshards.txt and no .tar shards in {split_dir}")
    return shards


def _samples(shards: list[Path]) -> Iterator[dict[str, bytes]]:
    """Samples as webdataset groups them: consecutive members sharing the name up to the first '.' of the
    file name; each sample maps lower-case extension -> bytes."""
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                key, sample = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, base = member.name.rpartition("/")
                    stem, dot, ext = base.partition(".")
                    if not dot:
                        continue
                    this = f"{folder}/{stem}"
                    if this != key and sample:
                        yield sample
                        sample = {}
                    key = this
                    sample[ext.lower()] = tar.extractfile(member).read()
                if sample:
                    yield sample
        except (tarfile.TarError, EOFError) as e:
            raise ValueError(f"zero-shot shard {shard} is not a readable tar file: {e}") from None


def _image_batches(shards: list[Path], preprocess: Callable, num_classes: int, batch_size: int,
                   labels: list[int], skipped: list[int], progress: bool) -> Iterator[torch.Tensor]:
    batch: list[torch.Tensor] = []
    for sample in tqdm(_samples(shards), desc="zeroshot images", disable=not progress):
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        try:
            label = int(sample.get("cls", b"").decode().strip())
        except (ValueError, UnicodeDecodeError):
            label = -1
        if ext is None or not 0 <= label < num_classes:
            skipped[0] += 1
            continue
        try:
            with Image.open(io.BytesIO(sample[ext])) as img:
                tensor = preprocess(img.convert("RGB"))
        except (UnidentifiedImageError, OSError):
            skipped[0] += 1
            continue
        batch.append(tensor)
        labels.append(label)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def classifier(model, tokenizer: Callable, classnames: list[str], templates: list[str] | tuple[str, ...], *,
               device: str | torch.device = "cpu", batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """(C, D) class embeddings: per class, the normalised mean of the normalised template embeddings."""
    texts = [t.replace("{c}", name) for name in classnames for t in templates]
    feats = encode_texts(model, tokenizer, texts, device=device, batch_size=batch_size, progress=progress,
                         desc="zeroshot classes")  # (C * T, D)
    mean = feats.view(len(classnames), len(templates), -1).mean(dim=1)  # (C, D)
    return torch.nn.functional.normalize(mean, dim=-1)


def evaluate(model, preprocess: Callable, tokenizer: Callable, data_dir: str | os.PathLike, *,
             device: str | torch.device = "cpu", batch_size: int = 64, split: str = "test",
             progress: bool = False) -> dict:
    """Zero-shot accuracy of `model` on a CLIP_benchmark webdataset directory (see the module docstring)."""
    _check_batch_size(batch_size)
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"zero-shot directory not found: {root}")
    if not (root / "classnames.txt").is_file():
        raise ValueError(f"zero-shot directory {root} has no classnames.txt")
    classnames = _read_lines(root / "classnames.txt")
    if not classnames:
        raise ValueError(f"{root / 'classnames.txt'} lists no class")
    notes = []
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
    shards = _shards(split_dir)

    labels: list[int] = []
    skipped = [0]
    with eval_mode(model):
        weights = classifier(model, tokenizer, classnames, templates, device=device, batch_size=batch_size,
                             progress=progress)  # (C, D)
        feats = encode_image_batches(
            model, _image_batches(shards, preprocess, len(classnames), batch_size, labels, skipped, progress),
            device=device)  # (N, D)
    if skipped[0]:
        notes.append(f"{skipped[0]} sample(s) skipped: no image, no valid label, or an unreadable image")
    result: dict = {"num_classes": len(classnames), "num_templates": len(templates), "num_examples": len(labels),
                    "num_skipped": skipped[0], "notes": notes}
    if not labels:
        raise ValueError(f"no usable sample in {split_dir} ({skipped[0]} skipped)")
    target = torch.tensor(labels)  # (N,)
    logits = feats @ weights.T  # (N, C) cosine similarities
    k = min(5, len(classnames))
    topk = logits.topk(k, dim=1).indices  # (N, k) best first
    hit1 = topk[:, 0] == target
    result["top1"] = hit1.float().mean().item()
    if len(classnames) >= 5:
        result["top5"] = (topk == target[:, None]).any(dim=1).float().mean().item()
    per_class = {}
    for c, name in enumerate(classnames):
        mask = target == c
        per_class[name] = hit1[mask].float().mean().item() if mask.any() else None
    present = [v for v in per_class.values() if v is not None]
    result["mean_per_class_recall"] = sum(present) / len(present)
    result["per_class"] = per_class
    return result


__all__ = ["evaluate", "classifier", "IMAGE_EXTENSIONS", "DEFAULT_TEMPLATES"]
