"""REPLACE negatives: one entity, attribute or relation of the caption's scene graph swapped for a plausible other.

    opts = options(parse, lexicon)               # one Option per replaceable element, with its candidate table
    text, kind, old, new = draw(caption, opts, rng)

Where candidates come from, by element role (see parse.py for the roles):
- entity head nouns `E`, attributes `A` and verbs `V`: WordNet antonyms and co-hyponyms (lexicon.py), never a
  synonym; a compound head (fire hydrant) is looked up whole first, its root noun otherwise;
- entity nouns by category (caption_words.NOUN_GROUPS through WordNet senses), attributes by class or antonym,
  verbs by frame (caption_words.VERB_FRAMES; transitive stays transitive);
- prepositions and phrasal prepositions `P`: spatial ones only, and only when their object is a thing, animal
  or person (SPATIAL_GROUPS below); near synonyms share a group and never replace each other;
- numbers `N`: another number of the same notation (words or digits), never "one", so "two dogs" stays plural.
Each element weighs min(2, number of candidates) (Table.weight), after CLoVe, which takes up to two candidates
per element and then draws uniformly from all of them; the candidate itself is drawn by frequency. The new word
is inflected like the old (tense, number, degree), takes its casing, and a preceding "a"/"an" is corrected. A
draw whose new word already occurs in the caption ("a black and black bus") is rejected and drawn again.
"""
from __future__ import annotations

import bisect
from typing import Any

from .inflect import fix_article, inflect, match_case
from .lexicon import Table, make_table
from .parse import Parse

ROLE_KIND = {"E": "replace-entity", "A": "replace-attribute", "N": "replace-attribute",
             "V": "replace-relation", "P": "replace-relation"}
_WORDNET_POS = {"E": "n", "A": "a", "V": "v"}

# Spatial prepositions in groups of near synonyms ("in a field" / "on a field"), which never replace each other.
# Only the first word of a group, with its rough occurrences per million words, is ever put in as a replacement:
# "upon", "atop", "within" and the like read as stilted, and "with", "from", "by", "through" are no spatial
# replacement at all. Relations outside these groups ("of", "for", "through", "along") are not replaced, except
# "with" <-> "without", which swap only with each other.
SPATIAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("on", "onto", "upon", "atop", "on top of", "in", "inside", "into", "within", "inside of", "at"),
    ("under", "below", "beneath", "underneath"),
    ("above", "over"),
    ("next to", "beside", "near", "close to", "alongside", "by"),
    ("in front of", "ahead of"),
    ("behind", "in back of"),
)
SPATIAL_WEIGHTS = {"on": 6000, "under": 500, "above": 200, "next to": 120, "in front of": 80, "behind": 220}
# Sources that are replaced: "by" (agent or place) and "at" ("looking at") are too often not spatial.
SPATIAL_SOURCES = frozenset(w for g in SPATIAL_GROUPS for w in g) - {"by", "at", "into", "onto"}
# What a preposition's object must be for the relation to change: a thing, an animal or a person, not a place,
# a garment ("a man in a suit") or a body part ("in her arms").
RELATION_OBJECT_GROUPS = frozenset({"bird", "pet", "large animal", "wheeled", "boat", "aircraft", "furniture", "food", "drink", "container",
                                    "sports", "electronics", "appliance", "plant", "street", "household"})


def _preposition_tables() -> dict[str, Table]:
    tables: dict[str, Table] = {}
    for group in SPATIAL_GROUPS:
        # "on" only stands in for under/above: "parked on a car" or "brushing her teeth on a mirror" is no scene
        table = make_table({w.replace(" ", "_"): f for w, f in SPATIAL_WEIGHTS.items() if w not in group and
                            (w != "on" or group[0] in ("under", "above"))})
        assert table is not None
        for word in group:
            if word in SPATIAL_SOURCES:
                tables[word] = table
    for word, other in (("with", "without"), ("without", "with")):
        tables[word] = make_table({other: 1})  # type: ignore[assignment]
    return tables


# Numbers with rough occurrences per million words; both notations, "one" excluded (it would break agreement).
NUMBER_WEIGHTS: tuple[tuple[str, int], ...] = (
    ("two", 1000), ("three", 600), ("four", 350), ("five", 280), ("six", 180), ("seven", 110), ("eight", 100),
    ("nine", 70), ("ten", 140), ("twelve", 40))


def _fixed_tables(groups: tuple[tuple[tuple[str, int], ...], ...]) -> dict[str, Table]:
    """word -> table of every word outside its group."""
    tables = {}
    for group in groups:
        others = {w: f for g in groups if g is not group for w, f in g}
        table = make_table(others)
        assert table is not None
        for word, _ in group:
            tables[word] = table
    return tables


PREPOSITION_TABLES = _preposition_tables()
NUMBER_TABLES = {**_fixed_tables(tuple(((w, f),) for w, f in NUMBER_WEIGHTS)),
                 **_fixed_tables(tuple(((str(i), f),) for i, (_, f) in zip((2, 3, 4, 5, 6, 7, 8, 9, 10, 12),
                                                                            NUMBER_WEIGHTS)))}


# One replaceable element: (start, end, candidate table, Penn tag to inflect to, kind). Plain tuples: this runs
# for every caption of every epoch.
Option = tuple[int, int, Table, str, str]


def relation_object_ok(lemma: str, lexicon: Any) -> bool:
    """Whether a spatial relation to this object can change into another (RELATION_OBJECT_GROUPS or a person)."""
    if lexicon.noun_category(lemma) in ("place", "noun.body"):
        return False
    if lexicon.noun_group(lemma) in RELATION_OBJECT_GROUPS:
        return True
    return lexicon.noun_category(lemma) == "noun.person"


def options(parse: Parse, lexicon: Any) -> list[Option]:
    """The elements of `parse` that have at least one candidate, in parse order."""
    out = []
    for role, start, end, lemma, tag, alt_start, alt_lemma in parse.elements:
        table: Table | None
        if role == "P":
            table = PREPOSITION_TABLES.get(lemma)
            if table is not None and lemma not in ("with", "without") and \
                    not relation_object_ok(alt_lemma, lexicon):
                table = None
        elif role == "N":
            table = NUMBER_TABLES.get(lemma)
        elif role == "V":
            table = lexicon.table(lemma, "v" if alt_lemma == "t" else "vi")
        else:
            pos = _WORDNET_POS[role]
            table = lexicon.table(lemma, pos)
            if table is None and alt_start >= 0:
                start, table = alt_start, lexicon.table(alt_lemma, pos)
        if table is not None:
            out.append((start, end, table, tag, ROLE_KIND[role]))
    return out


def rewrite(caption: str, start: int, end: int, word: str, tag: str) -> tuple[str, str, str]:
    """(negative, old surface, new surface): caption[start:end] replaced by `word` inflected as `tag`."""
    old = caption[start:end]
    new = match_case(old, inflect(word, tag))
    before = caption[:start]
    if before[-3:].lower().endswith(("a ", "an ")):
        before = fix_article(before, new)
    return before + new + caption[end:], old, new


def draw(caption: str, opts: list[Option], rng: Any) -> tuple[str, str, str, str] | None:
    """(text, kind, old, new) for one element and one candidate, or None when the draw is no good: unchanged, or
    the new word already in the caption ("a black and black bus")."""
    if not opts:
        return None
    pick = rng.random() * sum(o[2].weight for o in opts)
    for opt in opts:
        pick -= opt[2].weight
        if pick < 0:
            break
    start, end, table, tag, kind = opt
    word = table.words[bisect.bisect_right(table.cum, int(rng.random() * table.total))]
    text, old, new = rewrite(caption, start, end, word, tag)
    folded = new.casefold()
    if folded == old.casefold() or contains_word(caption.casefold(), folded):
        return None
    return text, kind, old, new


def contains_word(text: str, word: str) -> bool:
    """Whether `word` occurs in `text` as a whole word (or phrase)."""
    at = text.find(word)
    while at >= 0:
        end = at + len(word)
        if (at == 0 or not text[at - 1].isalnum()) and (end == len(text) or not text[end].isalnum()):
            return True
        at = text.find(word, at + 1)
    return False
