"""Regression tests for the failure classes of issue 11, each seen in negatives read one by one.

Every test runs the real spaCy pipeline and the real WordNet, draws many epochs, and checks a property of the
produced text with plain string rules or NLTK's reader, not with the helper under test.
"""
from __future__ import annotations

import json
import re

import lemminflect
import pytest

from clove_dist.config import ConfigError, NegativesConfig
from clove_dist.negatives import Negative, build, replace
from clove_dist.negatives import precompute
from clove_dist.negatives.caption_words import NOUN_GROUPS, PERSON_GROUPS
from clove_dist.negatives.sidecar import sidecar_path
from clove_dist.negatives.vocabulary import VOCAB_NAME, load_vocabulary


@pytest.fixture(scope="module")
def gen():
    return build(NegativesConfig(style="both", max_per_caption=3))


def draws(g, caption: str, epochs: int = 60, key: str = "k") -> list[Negative]:
    out: list[Negative] = []
    for epoch in range(epochs):
        out += g.generate(caption, key, epoch)
    return out


# --- senses and categories -------------------------------------------------------------------------------------

def test_plate_is_tableware_not_home_plate(gen):
    """'A second base of pasta': plate read in WordNet's first sense (baseball)."""
    negs = [n for n in draws(gen, "A plate of pasta on a table.") if n.old == "plate"]
    assert negs
    for n in negs:
        assert n.new in NOUN_GROUPS["plate"] and "base" not in n.new, n


def test_people_and_person_get_no_abstract_replacement(gen):
    """'Several knowledges flying kites', 'A location skiing': group and top-level senses of people/person."""
    for caption in ("Several people flying kites on a beach.", "A person skiing down a slope."):
        for n in draws(gen, caption):
            if n.old.lower() in ("people", "person"):
                pytest.fail(f"{caption!r} -> {n.text!r}")
            assert n.old.lower() != "several", n  # a quantifier is no attribute


def test_entity_candidates_are_everyday_words_of_one_category(gen):
    """Rare taxa ('angiocarps', 'hawkweeds', 'scorzonera') and wrong categories ('tree' -> 'galaxy')."""
    listed = {w for words in NOUN_GROUPS.values() for w in words} | {w for g in PERSON_GROUPS for w in g}
    for caption, word in (("A giraffe standing next to a tall tree.", "tree"),
                          ("A vase with red roses on a table.", "roses"), ("A dog sleeping on a bed.", "dog")):
        group = next(g for g, words in NOUN_GROUPS.items() if word.rstrip("s") in words)
        negs = [n for n in draws(gen, caption, 80) if n.old == word]
        assert negs, caption
        for n in negs:
            singular = lemminflect.getLemma(n.new.lower(), upos="NOUN")[0] if word.endswith("s") else n.new.lower()
            assert singular in listed and singular in NOUN_GROUPS[group], (n, group)


def test_teddy_bear_is_one_noun(gen):
    """'teddy -> system': the tagger read 'bears' as a verb and 'teddy' became a noun of its own."""
    for caption in ("Two teddy bears sitting on a bed.", "A teddy bear sitting on a chair.",
                    "A man holding a hot dog."):
        for n in draws(gen, caption, 40):
            assert n.old.lower() not in ("teddy", "hot", "dog"), (caption, n)


def test_person_replacements_differ_visibly(gen):
    """'man -> reporter', 'woman -> mother': a replacement must be false of the picture, not a kind of it."""
    negs = [n for n in draws(gen, "A woman riding a horse.", 80) if n.old == "woman"]
    assert negs
    for n in negs:
        assert n.new not in ("person", "mother", "adult", "lady", "reporter", "employee"), n
    kids = [n for n in draws(gen, "A boy throwing a ball.", 80) if n.old == "boy"]
    assert kids and all(n.new not in ("child", "kid", "little boy") for n in kids)
    pronoun = [n for n in draws(gen, "A girl brushing her teeth.", 80) if n.old == "girl"]
    male = {"man", "boy", "guy", "gentleman", "father", "old man", "young man", "little boy"}
    assert pronoun and not any(n.new in male for n in pronoun)  # "her teeth" keeps the gender


# --- relations -------------------------------------------------------------------------------------------------

SPATIAL_NEAR_SYNONYMS = [{"on", "onto", "upon", "atop", "on top of", "in", "inside", "into", "within", "at"},
                         {"next to", "beside", "near", "close to", "by"}, {"under", "below", "beneath"}]


def test_no_with_from_by_through_as_spatial_replacement(gen):
    """'A man through a red shirt', 'in a right', 'riding a horse from a crowd'."""
    captions = ["A man in a red shirt standing next to a car.", "A cat sitting on a laptop on a desk.",
                "A dog lying under a wooden table.", "A vase of flowers next to a lamp.",
                "A police officer riding a horse in a crowd."]
    for i, caption in enumerate(captions):
        for n in draws(gen, caption, 50, key=str(i)):
            if n.kind == "replace-relation" and n.old.lower() not in ("with", "without"):
                assert n.new not in ("with", "from", "by", "through", "without"), (caption, n)
                assert not any(n.old in g and n.new in g for g in SPATIAL_NEAR_SYNONYMS), (caption, n)


def test_relations_to_places_and_garments_stay(gen):
    """'in a field' -> 'on a field' (near-synonym), 'under a beach', 'a man under a suit'."""
    for caption in ("Three zebras grazing in a field.", "A man surfing in the ocean.", "A man in a suit.",
                    "People walking on a beach."):
        for n in draws(gen, caption, 50):
            assert n.kind != "replace-relation" or n.old not in ("in", "on"), (caption, n)


def test_verbs_keep_their_frame(gen):
    """'standing -> rising', 'docked -> penetrated', 'hold -> let go of' every time."""
    stand = [n for n in draws(gen, "A man standing on a chair.", 80) if n.old == "standing"]
    assert stand and {n.new for n in stand} <= {"sitting", "kneeling", "lying"}
    assert not [n for n in draws(gen, "A boat docked at a pier next to a car.", 60) if n.old == "docked"]
    hold = [n for n in draws(gen, "A woman holding a frisbee.", 80) if n.old == "holding"]
    assert hold and all("let go" not in n.new for n in hold) and len({n.new for n in hold}) >= 2
    # a transitive verb is replaced by a transitive one; birds do not lie on branches
    for n in draws(gen, "A boy kicking a ball.", 60):
        if n.old == "kicking":
            assert n.new in ("throwing", "catching", "holding"), n
    assert not [n for n in draws(gen, "A bird sitting on a fence.", 60) if n.old == "sitting"]


# --- swaps -----------------------------------------------------------------------------------------------------

def test_no_swap_inside_a_coordination_or_a_noun(gen):
    """'a white and black cow' -> 'a black and white cow'; 'bride and groom'; 'apples and oranges'."""
    g = build(NegativesConfig(style="swap", max_per_caption=3))
    for caption in ("A white and black cow standing in a field.", "A bride and groom cutting a cake.",
                    "A bowl of apples and oranges on a table.", "A small brown dog next to a chair."):
        for n in draws(g, caption, 40):
            words_a = sorted(re.findall(r"\w+", n.text.lower()))
            assert words_a != sorted(re.findall(r"\w+", caption.lower())) or n.kind == "swap-noun", (caption, n)
            assert not (n.kind == "swap-adjective" and {n.old.lower(), n.new.lower()} <= {"white", "black",
                                                                                          "small", "brown"})
            assert {n.old.lower(), n.new.lower()} not in ({"bride", "groom"}, {"apples", "oranges"}), n


def test_determiners_are_no_adjectives(gen):
    for caption in ("Several dogs playing with many balls.", "Many people walking past several cars."):
        for n in draws(gen, caption, 40):
            assert n.old.lower() not in ("several", "many") and n.new.lower() not in ("several", "many"), n


def test_swaps_change_the_scene():
    """A swap across a symmetric relation says the same thing ('a bathtub next to a toilet'); across a directed
    one or moving an attribute it does not."""
    g = build(NegativesConfig(style="swap", max_per_caption=3))
    assert not draws(g, "A toilet next to a bathtub in a bathroom.", 30)
    texts = {n.text for n in draws(g, "A blue truck parked behind a white van.", 30)}
    assert "A white van parked behind a blue truck." in texts


# --- text window -----------------------------------------------------------------------------------------------

def test_no_edit_beyond_the_tokenizer_context():
    """6 of 120 negatives of 200-560 character captions were identical to their caption after truncation."""
    from open_clip import get_tokenizer
    tokenize = get_tokenizer("ViT-B-32")
    g = build(NegativesConfig(style="both", max_per_caption=3))
    filler = ", ".join(["a very detailed photograph of an extremely beautiful old wooden house"] * 6)
    caption = f"A man riding a horse on a beach, {filler}, a red car parked next to a small dog."
    assert len(tokenize([caption])[0].nonzero()) == 77  # the caption really is cut
    base = tokenize([caption])[0]
    negs = draws(g, caption, 60)
    assert negs
    for n in negs:
        assert not bool((tokenize([n.text])[0] == base).all()), n  # the encoder sees the change
    unlimited = build(NegativesConfig(style="both", max_per_caption=3, context_length=0))
    late = [n for n in draws(unlimited, caption, 60) if caption.index(n.old) > 300]
    assert late  # without the limit, edits past the window are made: the test above can fail


# --- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("caption", [None, b"a dog on a bed", 42, 3.5])
def test_non_string_captions_are_skipped_and_counted(caption):
    g = build(NegativesConfig(style="both"))
    assert g.generate(caption, "k") == []  # type: ignore[arg-type]
    out = g.generate_many(["A dog on a bed.", caption], ["a", "b"])  # type: ignore[list-item]
    assert out[1] == [] and out[0]
    assert g.stats["num_not_string"] == 2 and g.stats["num_captions"] == 3


def test_english_alt_text_without_function_words(gen):
    for caption in ("red car street stock photo", "vintage wooden chair white background",
                    "golden retriever puppy grass"):
        p = gen.parse(caption)
        assert p.status != "non_english", caption
    assert gen.parse("perro rojo calle foto casa grande").status == "non_english"


# --- corpus vocabulary and CLoVe's filter ----------------------------------------------------------------------

def test_precompute_writes_a_vocabulary_that_filters_candidates(tmp_path):
    from test_negatives_sidecar import write_shard
    captions = ["A dog sleeping on a bed.", "A cat sitting on a bed.", "A cat lying on a couch.",
                "A dog running in a park.", "A cat on a chair."] * 3
    samples = [{"key": f"{i:04d}", "txt": "", "json": {"top_caption": c}} for i, c in enumerate(captions)]
    shard = str(tmp_path / "00000.tar")
    write_shard(shard, samples)
    assert precompute.main(["--shards", shard]) == 0
    vocab = load_vocabulary(str(tmp_path / VOCAB_NAME)).counts
    assert vocab["cat"] == 9 and vocab["dog"] == 6 and vocab["bed"] == 6
    assert (tmp_path / "00000.negvocab.json").is_file() and sidecar_path(shard).endswith(".negparse.jsonl.gz")
    g = build(NegativesConfig(style="replace", max_per_caption=2, sidecar_dir=str(tmp_path), min_corpus_count=3))
    assert g.vocabulary_path == str(tmp_path / VOCAB_NAME)  # found beside the sidecars
    for n in draws(g, "A dog sleeping on a bed.", 60):
        if n.kind == "replace-entity":
            assert vocab.get(n.new.lower(), 0) >= 3, n  # only words the corpus uses often enough
    table = g.lexicon.table("dog", "n")
    assert table is not None and table.words == ("cat",)
    json.loads((tmp_path / VOCAB_NAME).read_text())  # plain JSON a person can read


def _relation_corpus(tmp_path, captions: list[str]) -> str:
    from test_negatives_sidecar import write_shard
    samples = [{"key": f"{i:04d}", "txt": "", "json": {"top_caption": c}} for i, c in enumerate(captions)]
    write_shard(str(tmp_path / "00000.tar"), samples)
    assert precompute.main(["--shards", str(tmp_path / "00000.tar")]) == 0
    return str(tmp_path / VOCAB_NAME)


def test_relations_come_from_the_corpus(tmp_path):
    """A corpus that says only left/right/above/below: "below" becomes "above", never "next to", which the captions
    never use; the vocabulary counts the prepositions apart from the nouns."""
    captions = ["A red cup below a blue vase.", "A green cup above a red box.", "A blue box to the left of a cup.",
                "A cup to the right of a green vase."] * 2
    path = _relation_corpus(tmp_path, captions)
    vocab = load_vocabulary(path)
    assert vocab.relations == {"below": 2, "above": 2, "to the left of": 2, "to the right of": 2}
    assert "below" not in vocab.counts and "above" not in vocab.counts
    g = build(NegativesConfig(style="replace", max_per_caption=3, vocabulary=path, min_corpus_count=2))
    new = {}
    for caption in captions[:4]:
        for n in draws(g, caption, 40):
            if n.kind == "replace-relation":
                new.setdefault(n.old, set()).add(n.new)
    assert new == {"below": {"above"}, "above": {"below"}, "to the left of": {"to the right of"},
                   "to the right of": {"to the left of"}}
    # Without a vocabulary the fixed weights keep "next to" among the targets of both vertical relations.
    plain = build(NegativesConfig(style="replace", max_per_caption=3))
    for caption, old in ((captions[0], "below"), (captions[1], "above")):
        got = {n.new for n in draws(plain, caption, 80) if n.kind == "replace-relation"}
        assert got == {"above" if old == "below" else "below", "next to"}, (old, got)


def test_relation_below_count_is_dropped_and_a_version_1_vocabulary_keeps_fixed_weights(tmp_path):
    path = _relation_corpus(tmp_path, ["A red cup below a blue vase."] * 3 + ["A green cup above a red box."])
    g = build(NegativesConfig(style="replace", max_per_caption=3, vocabulary=path, min_corpus_count=2))
    # "above" occurs once, under min_corpus_count, and "next to" never: "below" has no target left.
    assert not [n for n in draws(g, "A red cup below a blue vase.", 40) if n.kind == "replace-relation"]
    obj = json.loads(open(path).read())
    del obj["relations"]
    obj["version"] = 1
    (tmp_path / "v1.json").write_text(json.dumps(obj))
    assert load_vocabulary(str(tmp_path / "v1.json")).relations is None
    old = build(NegativesConfig(style="replace", max_per_caption=3, vocabulary=str(tmp_path / "v1.json"),
                                min_corpus_count=2))
    got = {n.new for n in draws(old, "A red cup below a blue vase.", 80) if n.kind == "replace-relation"}
    assert got == {"above", "next to"}
    # `clove-dist negatives` again over a complete sidecar whose vocabulary predates relations: recounted from the
    # sidecar's parses, and the sum has them again.
    shard_vocab = tmp_path / "00000.negvocab.json"
    shard_obj = json.loads(shard_vocab.read_text())
    del shard_obj["relations"]
    shard_vocab.write_text(json.dumps(shard_obj))
    assert precompute.main(["--shards", str(tmp_path / "00000.tar")]) == 0
    assert load_vocabulary(path).relations == {"below": 3, "above": 1}
    # A version 1 shard vocabulary the run does not recount (a shard outside --shards) leaves the sum without
    # relation counts, never with empty ones, which would switch every relation replacement off.
    (tmp_path / "00001.negvocab.json").write_text(json.dumps(shard_obj))
    assert precompute.main(["--shards", str(tmp_path / "00000.tar")]) == 0
    merged = json.loads(open(path).read())
    assert "relations" not in merged and load_vocabulary(path).relations is None
    assert {n.new for n in draws(build(NegativesConfig(style="replace", max_per_caption=3, vocabulary=path)),
                                 "A red cup below a blue vase.", 80) if n.kind == "replace-relation"} == \
        {"above", "next to"}


def test_require_structure_is_clove_filter():
    one = "A red double decker bus."
    two = "A dog sleeping on a bed."
    strict = build(NegativesConfig(style="replace", require_structure=True))
    loose = build(NegativesConfig(style="replace", require_structure=False))
    assert strict.generate(one, "k") == [] and strict.stats["num_unstructured"] == 1
    assert loose.generate(one, "k") and strict.generate(two, "k")


@pytest.mark.parametrize("key,value", [("min_corpus_count", -1), ("context_length", 2), ("context_length", -5)])
def test_new_keys_are_validated(key, value):
    with pytest.raises(ConfigError, match=f"negatives.{key}"):
        build(NegativesConfig(**{key: value}))


def test_preposition_tables_are_spatial_only():
    for word, table in replace.PREPOSITION_TABLES.items():
        if word in ("with", "without"):
            assert table.words == (("without",) if word == "with" else ("with",))
        else:
            assert not {"with", "from", "by", "through"} & set(table.words), word
