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
import re
from collections.abc import Mapping
from typing import Any

from .caption_words import (AGE_WORDS, ANIMAL_COLOURS, ANIMAL_GROUPS, COLOURS, CONTAINER_GROUPS, HANDLING_VERBS,
                            KID_NOUNS, NO_POSTURE_CHANGE, NO_SITTING, NON_SPATIAL_ON, PERSON_TRAITS, POSTURE_VERBS,
                            UNDER_GROUPS, person_gender)
from .inflect import fix_article, inflect, match_case
from .lexicon import Table, keep_words, make_table
from .parse import Parse

ROLE_KIND = {"E": "replace-entity", "A": "replace-attribute", "N": "replace-attribute",
             "V": "replace-relation", "P": "replace-relation"}
_PRONOUN = re.compile(r"\b(?:her|his|she|he|him|hers|herself|himself)\b", re.IGNORECASE)

# Spatial prepositions in groups of near synonyms ("in a field" / "on a field"), which never replace each other.
# Only the first word of a group, with its rough occurrences per million words, is ever put in as a replacement:
# "upon", "atop", "within" and the like read as stilted, and "with", "from", "by", "through" are no spatial
# replacement at all. Relations outside these groups ("of", "for", "through", "along") are not replaced, except
# "with" <-> "without", which swap only with each other.
SPATIAL_GROUPS: tuple[tuple[str, ...], ...] = (
    ("on", "onto", "upon", "atop", "on top of", "in", "inside", "into", "within", "inside of", "at"),
    ("under", "beneath", "underneath"),
    ("below",),
    ("above", "over"),
    ("next to", "beside", "near", "close to", "alongside", "by"),
    ("in front of", "ahead of"),
    ("behind", "in back of"),
    ("to the left of", "on the left of"),
    ("to the right of", "on the right of"),
)
SPATIAL_WEIGHTS = {"on": 6000, "under": 500, "below": 120, "above": 200, "next to": 120, "in front of": 80,
                   "behind": 220, "to the left of": 10, "to the right of": 10}
# What each group may become: support and containment only become "next to" or "under" ("a pizza above a tray",
# "a bench on a tree" are no scenes), "next to" only a directed relation (behind, in front of). "below" is a
# position, like "above", and the two become each other ("a sign below a clock"); "under" is also cover or support
# ("a cat under a table", "a bench under a tree"), which only becomes "next to" unless its object is furniture or
# a vehicle (caption_words.UNDER_GROUPS).
# With a corpus vocabulary that counts relations (vocabulary.py), the weights are the corpus counts instead and a
# target the captions use fewer than `negatives.min_corpus_count` times is dropped (preposition_tables).
SPATIAL_TARGETS = {"on": ("next to", "under"), "under": ("on", "next to", "above"), "above": ("below", "next to"),
                   "below": ("above", "next to"),
                   "next to": ("behind", "in front of"), "in front of": ("behind", "next to"),
                   "behind": ("in front of", "next to"), "to the left of": ("to the right of",),
                   "to the right of": ("to the left of",)}
# Sources that are replaced: "by" (agent or place) and "at" ("looking at") are too often not spatial.
SPATIAL_SOURCES = frozenset(w for g in SPATIAL_GROUPS for w in g) - {"by", "at", "into", "onto"}
# What a preposition's object must not be for the relation to change: a place, a garment ("a man in a suit"), a
# body part ("in her arms").
RELATION_OBJECT_EXCLUDED = frozenset({"clothing", "opening"})


def _preposition_tables() -> dict[str, Table]:
    tables: dict[str, Table] = {}
    for group in SPATIAL_GROUPS:
        table = make_table({w.replace(" ", "_"): SPATIAL_WEIGHTS[w] for w in SPATIAL_TARGETS[group[0]]})
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
_SUPPORT = frozenset(SPATIAL_GROUPS[0])
_UNDER_OR_SUPPORT = _SUPPORT | frozenset(SPATIAL_GROUPS[1])
_NEXT_TO = make_table({"next_to": 1})
assert _NEXT_TO is not None
NUMBER_TABLES = {**_fixed_tables(tuple(((w, f),) for w, f in NUMBER_WEIGHTS)),
                 **_fixed_tables(tuple(((str(i), f),) for i, (_, f) in zip((2, 3, 4, 5, 6, 7, 8, 9, 10, 12),
                                                                            NUMBER_WEIGHTS)))}


def preposition_tables(relations: Mapping[str, int] | None, min_count: int) -> tuple[dict[str, Table], Table | None]:
    """(source preposition -> candidates, the "next to" table of support and cover): the fixed weights above, or
    with the corpus's relation counts only the targets it uses at least `min_count` (and at least once) times,
    weighted by their counts; a source left without a target is not replaced."""
    if relations is None:
        return PREPOSITION_TABLES, _NEXT_TO

    def reweigh(table: Table) -> Table | None:
        return make_table({w.replace(" ", "_"): relations.get(w, 0) for w in table.words
                           if relations.get(w, 0) >= max(1, min_count)})

    tables = {word: reweigh(table) for word, table in PREPOSITION_TABLES.items()}
    return {w: t for w, t in tables.items() if t is not None}, reweigh(_NEXT_TO)


# One replaceable element: (start, end, candidate table, Penn tag to inflect to, kind). Plain tuples: this runs
# for every caption of every epoch.
Option = tuple[int, int, Table, str, str]


def relation_object_ok(lemma: str, lexicon: Any) -> bool:
    """Whether a spatial relation to this object can change into another: a thing, an animal or a person."""
    category = lexicon.noun_category(lemma)
    if category in ("place", "noun.body"):
        return False
    group = lexicon.noun_group(lemma)
    if group:
        return group not in RELATION_OBJECT_EXCLUDED
    return category == "noun.person"


def _subject_group(lemma: str, lexicon: Any) -> str:
    return "person" if lexicon.noun_category(lemma) == "noun.person" or lemma in ("people", "person") else \
        lexicon.noun_group(lemma)


def _verb_table(lemma: str, frame: str, lexicon: Any, after: str = "") -> Table | None:
    """Candidates of a verb in its frame "t|subject|object" or "i|subject|": posture verbs keep to what the
    subject can do (and one lies only on or in something), handling verbs do not throw people, animals or food,
    animals only change posture or gait."""
    kind, subject, obj = (frame.split("|") + ["", ""])[:3]
    table = lexicon.table(lemma, "v" if kind == "t" else "vi")
    if table is None:
        return None
    who = _subject_group(subject, lexicon) if subject else ""
    drop: set[str] = set()
    if who in ANIMAL_GROUPS and lemma not in POSTURE_VERBS and lemma not in ("walk", "run"):
        return None  # "a dog throwing a frisbee", "a giraffe cutting leaves"
    if lemma in POSTURE_VERBS:
        if who in NO_POSTURE_CHANGE:
            return None
        if who in NO_SITTING:
            drop.add("sit")
        if who in ANIMAL_GROUPS:
            drop.add("kneel")
        if not after.startswith((" on ", " in ", " inside ", " under ")) or after.startswith(" in front"):
            drop.update(("lie", "lay"))  # "lying at a table", "lying around a counter"
    if lemma in HANDLING_VERBS and obj:
        if _subject_group(obj, lexicon) in ANIMAL_GROUPS | {"person", "food", "mass food", "drink"}:
            return None
    if lemma in ("eat", "chew") and who in ANIMAL_GROUPS:
        return None
    if not drop:
        return table
    return keep_words(table, lambda w: w not in drop)


def _attribute_table(lemma: str, noun: str, lexicon: Any) -> Table | None:
    """An attribute's candidates given the noun it describes: animals keep animal colours, a child is not old."""
    table = lexicon.table(lemma, "a")
    if table is None or not noun:
        return table
    if lemma in ("young", "old", "new") and noun.replace("_", " ") in KID_NOUNS:
        return None
    if lemma in COLOURS and lexicon.noun_category(noun) == "place":
        return None  # "a brown sky", "a purple sea"
    if lexicon.noun_group(noun) in ANIMAL_GROUPS:
        if lemma not in ANIMAL_COLOURS and lemma in COLOURS:
            return None
        return keep_words(table, lambda w: w not in COLOURS or w in ANIMAL_COLOURS)
    return table


def _person_table(table: Table, word: str, before: str, gendered: bool) -> Table | None:
    """A person noun's candidates in context: a pronoun fixes the gender ("a girl brushing her teeth"), an age
    word before it the age ("an old man" -> not "an old boy")."""
    gender = person_gender(word)
    words = before.rstrip().rsplit(" ", 1)
    age = AGE_WORDS.get(words[-1].lower()) if words and words[-1] else None
    keep = {}
    for w, c, p in zip(table.words, table.cum, (0,) + table.cum):
        if gendered and (person_gender(w) not in ("", gender) or w in ("child", "kid")):
            continue
        if age is not None and (" " in w or (age and PERSON_TRAITS[w][1] not in (age, "")) or
                                (not age and PERSON_TRAITS[w][1] == "baby")):
            continue  # "young" keeps man <-> woman, boy <-> girl; no "old young man"
        keep[w.replace(" ", "_")] = c - p
    return make_table(keep)


def _gendered(caption: str) -> bool:
    return _PRONOUN.search(caption) is not None


def options(parse: Parse, lexicon: Any, caption: str = "",
            prepositions: tuple[dict[str, Table], Table | None] = (PREPOSITION_TABLES, _NEXT_TO)) -> list[Option]:
    """The elements of `parse` that have at least one candidate, in parse order. `caption` (optional) keeps a
    person's gender when a pronoun refers to it ("a girl brushing her teeth"); `prepositions` are the relation
    tables (preposition_tables: the fixed weights, or the corpus's)."""
    out = []
    preposition_table, next_to = prepositions
    gendered = _gendered(caption) if caption else False
    for role, start, end, lemma, tag, alt_start, alt_lemma in parse.elements:
        table: Table | None
        if role == "P":
            table = preposition_table.get(lemma)
            obj, _, head = alt_lemma.partition("|")
            if table is not None and lemma not in ("with", "without"):
                if not relation_object_ok(obj, lexicon) or \
                        (lemma == "on" and head.partition("|")[0] in NON_SPATIAL_ON):
                    table = None
                elif lexicon.noun_group(obj) not in UNDER_GROUPS and lemma in _UNDER_OR_SUPPORT or \
                        lemma in _SUPPORT and head.endswith("|VERB"):
                    table = next_to  # someone sitting on a thing, a pizza on a tray, a bench under a tree
        elif role == "N":
            table = NUMBER_TABLES.get(lemma)
        elif role == "V":
            table = _verb_table(lemma, alt_lemma, lexicon, caption[end:end + 12])
        elif role == "A":
            table = _attribute_table(lemma, alt_lemma, lexicon)
        else:
            # A compound without a table of its own keeps its root: "home plate" -> "home tray", "wedding cake"
            # -> "wedding egg", "tennis racket" -> "tennis bat" read wrong more often than not.
            table = lexicon.table(lemma, "n")
            if table is not None and caption[end:end + 4] == " of " and \
                    lexicon.noun_group(lemma) not in CONTAINER_GROUPS:
                table = None  # "a vase of roses" -> "a mirror of roses": only containers head such a phrase
            if table is not None and lemma.replace("_", " ") in PERSON_TRAITS:
                table = _person_table(table, lemma.replace("_", " "), caption[:start], gendered)
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
