"""The corpus vocabulary: how often each lemma occurs in the training captions, counted while they are parsed.

    clove-dist negatives --shards '/data/{00000..00999}.tar' --out /scratch/negparse
    # writes /scratch/negparse/<shard>.negvocab.json per shard and /scratch/negparse/negatives.vocab.json (the sum)
    vocab = load_vocabulary("/scratch/negparse/negatives.vocab.json")      # {lemma: count}

REPLACE candidates then come from words the data uses: a replacement must occur at least
`negatives.min_corpus_count` times and is drawn in proportion to its count (a word the captions never use teaches
the text encoder nothing the images can confirm). Lemmas are counted per element of the parse: entity heads (a
compound whole, "fire hydrant", and its root noun), attributes, verbs; words joined by spaces, lowercase.
"""
from __future__ import annotations

import glob
import json
import os
from collections import Counter
from typing import Iterable

from ..errors import UserError
from .parse import Parse

FORMAT = "clove-dist-vocab"
VERSION = 1
VOCAB_NAME = "negatives.vocab.json"
SHARD_SUFFIX = ".negvocab.json"


def count_lemmas(parses: Iterable[Parse]) -> Counter:
    """Lemma counts of the entities, attributes and verbs of `parses`."""
    counts: Counter = Counter()
    for parse in parses:
        if parse.status != "ok":
            continue
        for role, _, _, lemma, _, alt_start, alt_lemma in parse.elements:
            if role in ("E", "A", "V"):
                counts[lemma.replace("_", " ")] += 1
                if role == "E" and alt_start >= 0:
                    counts[alt_lemma] += 1
    return counts


def _write(path: str, counts: Counter, num_shards: int) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "version": VERSION, "num_shards": num_shards,
                   "counts": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))}, f)
    os.replace(tmp, path)


def shard_vocab_path(sidecar: str) -> str:
    return sidecar[: -len(".negparse.jsonl.gz")] + SHARD_SUFFIX if sidecar.endswith(".negparse.jsonl.gz") \
        else sidecar + SHARD_SUFFIX


def write_shard_vocabulary(sidecar: str, counts: Counter) -> None:
    _write(shard_vocab_path(sidecar), counts, 1)


def merge_directory(directory: str) -> str:
    """Sum every per-shard vocabulary of `directory` into negatives.vocab.json there; returns its path."""
    total: Counter = Counter()
    shards = sorted(glob.glob(os.path.join(directory or ".", "*" + SHARD_SUFFIX)))
    for path in shards:
        total.update(load_vocabulary(path))
    out = os.path.join(directory or ".", VOCAB_NAME)
    _write(out, total, len(shards))
    return out


def load_vocabulary(path: str) -> dict[str, int]:
    """{lemma: count}; UserError naming the file when it is missing or not a vocabulary."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"negatives.vocabulary: cannot read {path} ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("counts"), dict):
        raise UserError(f"negatives.vocabulary: {path} is not a clove-dist vocabulary file")
    return {str(k): int(v) for k, v in obj["counts"].items()}


def default_vocabulary_path(sidecar_dir: str) -> str:
    """negatives.vocab.json in the sidecar directory when it exists there, else ''."""
    if not sidecar_dir:
        return ""
    path = os.path.join(sidecar_dir, VOCAB_NAME)
    return path if os.path.isfile(path) else ""
