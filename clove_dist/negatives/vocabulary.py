"""The corpus vocabulary: how often each lemma occurs in the training captions, counted while they are parsed.

    clove-dist negatives --shards '/data/{00000..00999}.tar' --out /scratch/negparse
    # writes /scratch/negparse/<shard>.negvocab.json per shard and /scratch/negparse/negatives.vocab.json (the sum)
    vocab = load_vocabulary("/scratch/negparse/negatives.vocab.json")  # .counts, .relations: {lemma: count}

REPLACE candidates then come from words the data uses: a replacement must occur at least
`negatives.min_corpus_count` times and is drawn in proportion to its count (a word the captions never use teaches
the text encoder nothing the images can confirm). Lemmas are counted per element of the parse: entity heads (a
compound whole, "fire hydrant", and its root noun), attributes, verbs; words joined by spaces, lowercase. The
prepositions of relations ("on", "to the left of") are counted apart, under "relations", so that "behind" the
preposition never counts as the noun, and so are attribute-noun pairs ("red|car"), under "pairs" (pairs.py: a
negative gives a noun no attribute the captions never give it). A file without relation counts (version 1)
still loads, relations then keep their fixed weights; one without pair counts (versions 1 and 2) puts no limit
on pairs.
"""
from __future__ import annotations

import glob
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from ..errors import UserError
from .parse import Parse

FORMAT = "clove-dist-vocab"
VERSION = 3  # 2 added relation counts, 3 attribute-noun pair counts
VOCAB_NAME = "negatives.vocab.json"
SHARD_SUFFIX = ".negvocab.json"


@dataclass
class Vocabulary:
    """Lemma counts of the entities, attributes and verbs (`counts`), of the relations' prepositions
    (`relations`) and of attribute-noun pairs ("red|car", `pairs`) of a corpus; None where the file predates them."""
    counts: Counter = field(default_factory=Counter)
    relations: Counter | None = field(default_factory=Counter)
    pairs: Counter | None = field(default_factory=Counter)


def pair_key(attribute: str, noun: str) -> str:
    """The `pairs` key of an attribute lemma and the lemma of the noun it describes."""
    return f"{attribute.replace('_', ' ').lower()}|{noun.replace('_', ' ').lower()}"


def count_lemmas(parses: Iterable[Parse]) -> Vocabulary:
    """Lemma counts of the entities, attributes, verbs and prepositions, and attribute-noun pairs, of `parses`."""
    counts: Counter = Counter()
    relations: Counter = Counter()
    pairs: Counter = Counter()
    for parse in parses:
        if parse.status != "ok":
            continue
        for role, _, _, lemma, _, alt_start, alt_lemma in parse.elements:
            if role in ("E", "A", "V"):
                counts[lemma.replace("_", " ")] += 1
                if role == "E" and alt_start >= 0:
                    counts[alt_lemma] += 1
                elif role == "A" and alt_lemma:
                    pairs[pair_key(lemma, alt_lemma)] += 1
            elif role == "P":
                relations[lemma.replace("_", " ").lower()] += 1
    return Vocabulary(counts, relations, pairs)


def _sorted(counts: Counter) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _write(path: str, vocab: Vocabulary, num_shards: int) -> None:
    obj = {"format": FORMAT, "version": VERSION, "num_shards": num_shards, "counts": _sorted(vocab.counts)}
    if vocab.relations is not None:  # without counts the key stays out: relations then keep their fixed weights
        obj["relations"] = _sorted(vocab.relations)
    if vocab.pairs is not None:
        obj["pairs"] = _sorted(vocab.pairs)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def shard_vocab_path(sidecar: str) -> str:
    return sidecar[: -len(".negparse.jsonl.gz")] + SHARD_SUFFIX if sidecar.endswith(".negparse.jsonl.gz") \
        else sidecar + SHARD_SUFFIX


def write_shard_vocabulary(sidecar: str, vocab: Vocabulary) -> None:
    _write(shard_vocab_path(sidecar), vocab, 1)


def merge_directory(directory: str) -> str:
    """Sum every per-shard vocabulary of `directory` into negatives.vocab.json there; returns its path. Relation
    and pair counts are each summed when every shard has them (an older shard among them leaves the sum without)."""
    total = Vocabulary()
    shards = sorted(glob.glob(os.path.join(directory or ".", "*" + SHARD_SUFFIX)))
    for path in shards:
        vocab = load_vocabulary(path)
        total.counts.update(vocab.counts)
        for name in ("relations", "pairs"):
            part, into = getattr(vocab, name), getattr(total, name)
            if into is not None and part is not None:
                into.update(part)
            else:
                setattr(total, name, None)
    out = os.path.join(directory or ".", VOCAB_NAME)
    _write(out, total, len(shards))
    return out


def is_current(path: str) -> bool:
    """Whether `path` is a readable vocabulary with everything this version counts (False when missing or older)."""
    try:
        vocab = load_vocabulary(path)
    except UserError:
        return False
    return vocab.relations is not None and vocab.pairs is not None


def load_vocabulary(path: str) -> Vocabulary:
    """The counts of a vocabulary file; UserError naming the file when it is missing or not a vocabulary."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"negatives.vocabulary: cannot read {path} ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("counts"), dict) or \
            not isinstance(obj.get("relations", {}), dict) or not isinstance(obj.get("pairs", {}), dict):
        raise UserError(f"negatives.vocabulary: {path} is not a clove-dist vocabulary file")
    def counter(name: str) -> Counter | None:
        part = obj.get(name)
        return None if part is None else Counter({str(k): int(v) for k, v in part.items()})
    return Vocabulary(counter("counts"), counter("relations"), counter("pairs"))  # type: ignore[arg-type]


def default_vocabulary_path(sidecar_dir: str) -> str:
    """negatives.vocab.json in the sidecar directory when it exists there, else ''."""
    if not sidecar_dir:
        return ""
    path = os.path.join(sidecar_dir, VOCAB_NAME)
    return path if os.path.isfile(path) else ""
