"""NegCLIP-style SWAP negatives: two words or phrases of the same kind change places.

    pairs = swap_pairs(caption, parse, lexicon)   # [(kind, (start, end), (start, end)), ...]
    text, kind, old, new = draw(caption, pairs, rng)

Kinds, from the spaCy parse (parse.py): two singular or two plural entity nouns (`swap-noun`, compounds such as
"fire hydrant" move whole, and number agreement holds), two adjectives (`swap-adjective`), two noun phrases of two
or more words (`swap-phrase`):
"a white dog chasing a black cat" -> "a black dog chasing a white cat" / "a black cat chasing a white dog".
Pairs whose texts are equal (case-folded) or whose spans overlap are left out, and so is a swap that puts a word
twice in a row ("a small small square"). Never swapped: two conjuncts of one coordination ("bride and groom", "a
bowl of apples and bananas": the meaning stays), two adjectives of one noun ("a white and black cow"), spans of
different classes (a person and a plate, a colour and a size: "a plate holding a man" is no scene), places, and
nouns linked by "of" ("a bowl of soup" -> "a soup of bowl"). A sentence-initial capital stays at
the start of the sentence, and an "a"/"an" before either span is corrected. `old` is the first span's text,
`new` the text that took its place.
"""
from __future__ import annotations

import re
from typing import Any

from .caption_words import ADJECTIVE_CLASSES, ANIMAL_GROUPS, PERSON_GROUPS, SIZE_ADJECTIVES, SPELLINGS
from .inflect import fix_article
from .parse import Parse

GROUP_KIND = {"noun-sg": "swap-noun", "noun-pl": "swap-noun", "adj": "swap-adjective", "np": "swap-phrase"}

Pair = tuple[str, tuple[int, int], tuple[int, int]]
_DOUBLED = re.compile(r"\b(\w+) \1\b", re.IGNORECASE)
_ADJECTIVE_CLASS = {w: str(i) for i, words in enumerate(ADJECTIVE_CLASSES) for w in words}
_PERSONS = frozenset(w for group in PERSON_GROUPS for w in group) | {"person", "people"}
_MERGED = {**{g: "animal" for g in ANIMAL_GROUPS}, "road vehicle": "vehicle", "two-wheeler": "vehicle"}
# Relations whose two sides cannot trade places without changing the scene; "next to", "and", "with" can, so a
# swap across them says the same thing unless an attribute changes its noun.
_DIRECTED = re.compile(r"\b(?:on|under|above|below|behind|in front of|on top of|inside|over|beneath|atop|"
                       r"left of|right of)\b")


def swap_class(group: str, lemma: str, lexicon: Any) -> str:
    """What a span may swap with: persons with persons, animals with animals, vehicles with vehicles, other
    things within their category, colours with colours, sizes with sizes; '' = never swapped (places: "a blue
    grass swimming on five cats" is no scene; words no table knows)."""
    if group == "adj":
        word, _, noun = lemma.partition("|")
        word = SPELLINGS.get(word, word)
        kind = "size" if word in SIZE_ADJECTIVES else _ADJECTIVE_CLASS.get(word, "")
        noun_class = swap_class("noun-sg", noun, lexicon) if noun else ""
        return f"{kind}:{noun_class}" if kind and noun_class else ""  # "a red sky" from "a red kite": no
    spaced = lemma.replace("_", " ")
    if spaced in _PERSONS or spaced.rsplit(" ", 1)[-1] in _PERSONS:
        return "person"
    category = lexicon.noun_category(lemma)
    if category == "place":
        return ""
    if category == "noun.person":
        return "person"
    noun_group = lexicon.noun_group(lemma)
    return _MERGED.get(noun_group, noun_group)


def swap_pairs(caption: str, parse: Parse, lexicon: Any) -> list[Pair]:
    """Every pair of same-group, same-class spans with different texts and different owners that changes the
    scene: across a directed relation ("a truck behind a van"), or moving an attribute ("a motorcycle next to a
    red car"); adjectives always move (that is the change)."""
    by_group: dict[str, list[tuple[int, int, int, str]]] = {}
    for group, start, end, owner, lemma in parse.swaps:
        cls = swap_class(group, lemma, lexicon)
        if cls:
            by_group.setdefault(group, []).append((start, end, owner, cls))
    described = {o for g, _, _, o, _ in parse.swaps if g == "adj"}
    noun_owner = {(s, e): o for g, s, e, o, _ in parse.swaps if g in ("noun-sg", "noun-pl")}
    pairs: list[Pair] = []
    for group, spans in by_group.items():
        kind = GROUP_KIND[group]
        for i, (s1, e1, o1, c1) in enumerate(spans):
            text_a = caption[s1:e1].casefold()
            for s2, e2, o2, c2 in spans[i + 1:]:
                if o1 == o2 or c1 != c2 or not (e1 <= s2 or e2 <= s1):
                    continue
                if caption[s2:e2].casefold() == text_a:
                    continue
                a, b = ((s1, e1), (s2, e2)) if s1 < s2 else ((s2, e2), (s1, e1))
                if group != "adj":
                    between = caption[a[1]:b[0]].casefold()
                    moves_attribute = group in ("noun-sg", "noun-pl") and \
                        (_owner_described(noun_owner, a, described) or _owner_described(noun_owner, b, described))
                    if not _DIRECTED.search(between) and not moves_attribute:
                        continue
                pairs.append((kind, a, b))
    return pairs


def _owner_described(noun_owner: dict, span: tuple[int, int], described: set[int]) -> bool:
    """Whether the noun at `span` has an adjective (its coordination id is the noun's own token index)."""
    return noun_owner.get(span, -1) in described


def _sentence_case(first: str, moved: str) -> tuple[str, str]:
    """`first` now opens the sentence and `moved` left that place: hand the capital over."""
    head = moved.split(" ", 1)[0]
    if head[:1].isupper() and head[1:] == head[1:].lower() and first[:1].islower():
        return first[:1].upper() + first[1:], moved[:1].lower() + moved[1:]
    return first, moved


def apply_swap(caption: str, a: tuple[int, int], b: tuple[int, int]) -> tuple[str, str, str]:
    """(negative, old, new): the spans a (earlier) and b exchanged."""
    (s1, e1), (s2, e2) = a, b
    t1, t2 = caption[s1:e1], caption[s2:e2]
    new_first, new_second = t2, t1
    if not caption[:s1].strip():
        new_first, new_second = _sentence_case(t2, t1)
    before = fix_article(caption[:s1], new_first)
    middle = fix_article(caption[e1:s2], new_second)
    return before + new_first + middle + new_second + caption[e2:], t1, new_first


def draw(caption: str, pairs: list[Pair], rng: Any) -> tuple[str, str, str, str] | None:
    """(text, kind, old, new) for one uniformly drawn pair, or None when there is none or nothing changed."""
    if not pairs:
        return None
    kind, a, b = pairs[int(rng.random() * len(pairs))]
    text, old, new = apply_swap(caption, a, b)
    if text.casefold() == caption.casefold():
        return None
    doubled = _DOUBLED.search(text)
    if doubled is not None and doubled.group(0).casefold() not in caption.casefold():
        return None  # "a small small square": not a sentence a caption writer would produce
    return text, kind, old, new
