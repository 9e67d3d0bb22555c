"""A negative never gives a noun an attribute the corpus never gives it (negatives/pairs.py), with the real spaCy
pipeline, WordNet and `clove-dist negatives` writing the vocabulary; what comes out is checked with string rules."""
from __future__ import annotations

import json

from clove_dist.config import NegativesConfig
from clove_dist.negatives import build, precompute
from clove_dist.negatives.vocabulary import VOCAB_NAME, load_vocabulary

# Each colour goes with two of the three vehicles: "green car", "blue bus" and "red truck" are in no caption.
CORPUS = ["A red car behind a green bus.", "A blue car behind a red bus.", "A blue truck behind a red car.",
          "A green truck behind a blue car.", "A red bus behind a green truck.", "A green bus behind a blue truck."]
UNSEEN = ("green car", "blue bus", "red truck")
CAPTION = "A red car behind a green bus."


def _corpus(tmp_path) -> str:
    from test_negatives_sidecar import write_shard
    samples = [{"key": f"{i:04d}", "txt": "", "json": {"top_caption": c}} for i, c in enumerate(CORPUS * 3)]
    write_shard(str(tmp_path / "00000.tar"), samples)
    assert precompute.main(["--shards", str(tmp_path / "00000.tar")]) == 0
    return str(tmp_path / VOCAB_NAME)


def _texts(vocabulary: str) -> dict[str, set[str]]:
    g = build(NegativesConfig(style="both", max_per_caption=3, vocabulary=vocabulary, min_corpus_count=2))
    out: dict[str, set[str]] = {}
    for epoch in range(150):
        for n in g.generate(CAPTION, "k", epoch):
            out.setdefault(n.kind, set()).add(n.text)
    return out


def test_vocabulary_counts_attribute_noun_pairs(tmp_path):
    vocab = load_vocabulary(_corpus(tmp_path))
    assert vocab.pairs == {"red|car": 6, "blue|car": 6, "green|bus": 6, "red|bus": 6, "blue|truck": 6,
                           "green|truck": 6}


def test_negatives_make_no_pair_the_corpus_lacks(tmp_path):
    path = _corpus(tmp_path)
    got = _texts(path)
    every = set().union(*got.values())
    assert not [t for t in every if any(p in t.lower() for p in UNSEEN)], every
    # What stays: a colour the cup has elsewhere, a noun the colour has elsewhere, the phrases traded whole.
    assert "A blue car behind a green bus." in got["replace-attribute"]
    assert "A red car behind a green truck." in got["replace-entity"]
    assert "A green bus behind a red car." in got["swap-phrase"]
    # Without pair counts (a version 2 vocabulary) the same draws do make them: the filter is what keeps them out.
    obj = json.loads(open(path).read())
    del obj["pairs"]
    obj["version"] = 2
    (tmp_path / "v2.json").write_text(json.dumps(obj))
    assert load_vocabulary(str(tmp_path / "v2.json")).pairs is None
    old = set().union(*_texts(str(tmp_path / "v2.json")).values())
    made = {p for t in old for p in UNSEEN if p in t.lower()}
    assert made == set(UNSEEN), old


def test_an_older_vocabulary_is_counted_again_and_a_sum_with_one_keeps_no_pairs(tmp_path):
    path = _corpus(tmp_path)
    shard_vocab = tmp_path / "00000.negvocab.json"
    obj = json.loads(shard_vocab.read_text())
    del obj["pairs"]
    obj["version"] = 2
    shard_vocab.write_text(json.dumps(obj))
    # `clove-dist negatives` again over the complete sidecar: its vocabulary is counted again from the parses.
    assert precompute.main(["--shards", str(tmp_path / "00000.tar")]) == 0
    assert load_vocabulary(path).pairs["red|car"] == 6
    # A shard vocabulary without pairs that this run does not recount leaves the sum without pair counts (no
    # filter), never with empty ones (which would take every attribute and noun candidate away).
    (tmp_path / "00001.negvocab.json").write_text(json.dumps(obj))
    assert precompute.main(["--shards", str(tmp_path / "00000.tar")]) == 0
    assert load_vocabulary(path).pairs is None and "pairs" not in json.loads(open(path).read())
