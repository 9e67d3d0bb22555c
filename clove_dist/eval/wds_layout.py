"""CLIP_benchmark's webdataset layout, as `clip_benchmark_export_wds` writes it and `build_wds_dataset` reads it.

    data_dir/dataset_type.txt                          "retrieval" | "multilabel"; absent = classification
    data_dir/classnames.txt                            classification: class name of label i on line i
    data_dir/zeroshot_classification_templates.txt     classification: prompts with {c}
    data_dir/<split>/nshards.txt                       number of shards n
    data_dir/<split>/{0..n-1}.tar                      s%07d.{webp,png,jpg,jpeg} + .cls (label) or .txt (captions)

Shared by the zero-shot and retrieval evaluators: which kind of set a directory is, its shards, and its samples
grouped the way webdataset groups them. A shard that is not a readable tar (or breaks off part way) is skipped
after the samples read before the damage, and counted; it never stops an evaluation.
"""
from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS: tuple[str, ...] = ("webp", "png", "jpg", "jpeg")


def dataset_type(root: Path) -> str:
    """"retrieval", "multilabel" or "classification", as CLIP_benchmark decides it (dataset_type.txt, lower-cased;
    without that file, classification)."""
    type_file = root / "dataset_type.txt"
    if not type_file.is_file():
        return "classification"
    return type_file.read_text(encoding="utf-8", errors="replace").strip().lower() or "classification"


def describe_kind(root: Path) -> str:
    """One phrase saying what kind of evaluation set `root` looks like, for errors that reject it."""
    kind = dataset_type(root)
    if kind == "retrieval":
        return "a CLIP_benchmark retrieval set (dataset_type.txt says 'retrieval'; evaluate it with --retrieval)"
    if kind == "multilabel":
        return "a CLIP_benchmark multilabel classification set (dataset_type.txt says 'multilabel'; not supported)"
    if (root / "classnames.txt").is_file():
        return "a CLIP_benchmark zero-shot classification set (classnames.txt; evaluate it with --zeroshot)"
    if any((root / f"{s}.json").is_file() for s in ("replace_obj", "replace_att", "swap_att", "add_obj",
                                                     "replace_ent")):
        return "a SugarCrepe set (replace_*.json, swap_*.json, add_*.json; evaluate it with --sugarcrepe)"
    if any((root / f).is_file() for f in ("visual_genome_relation.json", "visual_genome_attribution.json",
                                          "coco_karpathy_test.json", "flickr30k_test.json")):
        return "an ARO set (visual_genome_*.json or *_test.json; evaluate it with --aro)"
    return "not an evaluation set this project reads"


def shards(split_dir: Path) -> list[Path]:
    """The split's shards: {0..n-1}.tar from nshards.txt, else every *.tar in numeric order."""
    nshards_file = split_dir / "nshards.txt"
    if nshards_file.is_file():
        text = nshards_file.read_text().strip()
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{nshards_file} must hold a positive shard count, got {text!r}")
        found = [split_dir / f"{i}.tar" for i in range(int(text))]
        absent = [str(s) for s in found if not s.is_file()]
        if absent:
            raise ValueError(f"{nshards_file} lists {text} shards but {absent[0]} does not exist")
        return found
    found = sorted(split_dir.glob("*.tar"), key=lambda p: (int(p.stem) if p.stem.isdigit() else 1 << 62, p.name))
    if not found:
        raise ValueError(f"no nshards.txt and no .tar shards in {split_dir}")
    return found


@dataclass
class ShardDamage:
    """Shards that could not be read to the end: their paths and the error of each."""
    shards: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def note(self) -> str | None:
        if not self.shards:
            return None
        return (f"{len(self.shards)} damaged shard(s) skipped from the point of damage: {self.shards[0]} "
                f"({self.errors[0]})" + (f" and {len(self.shards) - 1} more" if len(self.shards) > 1 else ""))


def samples(shard_paths: list[Path], damage: ShardDamage) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {lower-case extension: bytes}) as webdataset groups them: consecutive members sharing the name up to
    the first '.' of the file name. A damaged shard is recorded in `damage` and the next shard read."""
    for shard in shard_paths:
        key, sample = None, {}
        try:
            with tarfile.open(shard) as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, base = member.name.rpartition("/")
                    stem, dot, ext = base.partition(".")
                    if not dot:
                        continue
                    this = f"{folder}/{stem}" if folder else stem
                    if this != key and sample:
                        yield key, sample
                        sample = {}
                    key = this
                    sample[ext.lower()] = tar.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as e:
            # The sample being assembled when the damage hit may be incomplete: drop it, not half-score it.
            damage.shards.append(str(shard))
            damage.errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
            continue
        if sample:
            yield key, sample


def image_bytes(sample: dict[str, bytes]) -> bytes | None:
    """The sample's image in CLIP_benchmark's order of preference (webp, png, jpg, jpeg), or None."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    return None if ext is None else sample[ext]


def check_missing_share(what: str, num_missing: int, num_total: int, strict: bool, max_missing_share: float,
                        where: str) -> None:
    """Strict mode: ValueError when more than max_missing_share of a set's images could not be read."""
    if not strict or num_total == 0:
        return
    share = num_missing / num_total
    if share > max_missing_share:
        raise ValueError(f"{what}: {num_missing} of {num_total} images missing or unreadable under {where} "
                         f"({share:.1%} > the allowed {max_missing_share:.1%}; --no-strict scores the rest)")


__all__ = ["IMAGE_EXTENSIONS", "dataset_type", "describe_kind", "shards", "samples", "image_bytes", "ShardDamage",
           "check_missing_share"]
