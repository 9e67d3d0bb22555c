"""REPLACE negatives: one entity, attribute or relation of the caption's scene graph swapped for a plausible other.

    opts = options(parse, lexicon)               # one Option per replaceable element, with its candidate table
    text, kind, old, new = draw(caption, opts, rng)

Where candidates come from, by element role (see parse.py for the roles):
- entity head nouns `E`, attributes `A` and verbs `V`: WordNet antonyms and co-hyponyms (lexicon.py), never a
  synonym; a compound head (fire hydrant) is looked up whole first, its root noun otherwise;
- prepositions and phrasal prepositions `P`: the fixed list below, weighted by rough frequency in English. Near
  synonyms share a group and never replace each other (CLoVe's list would turn "on" into "on top of");
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

# Prepositions with rough occurrences per million words of written English. A group holds near synonyms, which
# never replace each other.
PREPOSITION_GROUPS: tuple[tuple[tuple[str, int], ...], ...] = (
    (("on", 6000), ("onto", 100), ("upon", 400), ("atop", 5), ("on top of", 30)),
    (("in", 16000), ("inside", 150), ("within", 400), ("into", 1600), ("inside of", 10)),
    (("under", 500), ("below", 120), ("beneath", 50), ("underneath", 15)),
    (("above", 200), ("over", 1000)),
    (("next to", 120), ("beside", 60), ("by", 4000), ("alongside", 30), ("near", 180), ("close to", 70)),
    (("in front of", 80), ("ahead of", 40)),
    (("behind", 220), ("in back of", 3)),
    (("between", 700), ("among", 250)),
    (("across from", 10), ("opposite", 40)),
    (("from", 3500), ("out of", 300), ("away from", 60)),
    (("outside", 150), ("outside of", 20)),
    (("toward", 200), ("towards", 150)),
    (("around", 500),), (("across", 250),), (("along", 250),), (("through", 800),), (("against", 400),),
    (("with", 5500),), (("without", 450),), (("at", 4000),), (("off", 500),), (("past", 150),),
    (("in the middle of", 40), ("in the center of", 10)), (("on the side of", 8), ("on the edge of", 10)),
    (("to the left of", 10), ("on the left of", 3)), (("to the right of", 10), ("on the right of", 3)),
    (("at the top of", 20),), (("at the bottom of", 20),),
)

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


PREPOSITION_TABLES = _fixed_tables(PREPOSITION_GROUPS)
NUMBER_TABLES = {**_fixed_tables(tuple(((w, f),) for w, f in NUMBER_WEIGHTS)),
                 **_fixed_tables(tuple(((str(i), f),) for i, (_, f) in zip((2, 3, 4, 5, 6, 7, 8, 9, 10, 12),
                                                                            NUMBER_WEIGHTS)))}


# One replaceable element: (start, end, candidate table, Penn tag to inflect to, kind). Plain tuples: this runs
# for every caption of every epoch.
Option = tuple[int, int, Table, str, str]


def options(parse: Parse, lexicon: Any) -> list[Option]:
    """The elements of `parse` that have at least one candidate, in parse order."""
    out = []
    for role, start, end, lemma, tag, alt_start, alt_lemma in parse.elements:
        table: Table | None
        if role == "P":
            table = PREPOSITION_TABLES.get(lemma)
        elif role == "N":
            table = NUMBER_TABLES.get(lemma)
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
