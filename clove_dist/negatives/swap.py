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

from .caption_words import ADJECTIVE_CLASSES, PERSON_GROUPS, SIZE_ADJECTIVES, SPELLINGS
from .inflect import fix_article
from .parse import Parse

GROUP_KIND = {"noun-sg": "swap-noun", "noun-pl": "swap-noun", "adj": "swap-adjective", "np": "swap-phrase"}

Pair = tuple[str, tuple[int, int], tuple[int, int]]
_DOUBLED = re.compile(r"\b(\w+) \1\b", re.IGNORECASE)
_VEHICLES = frozenset({"wheeled", "boat", "aircraft"})
_ADJECTIVE_CLASS = {w: str(i) for i, words in enumerate(ADJECTIVE_CLASSES) for w in words}
_PERSONS = frozenset(w for group in PERSON_GROUPS for w in group) | {"person", "people"}


def swap_class(group: str, lemma: str, lexicon: Any) -> str:
    """What a span may swap with: persons with persons, animals with animals, vehicles with vehicles, other
    things with things, colours with colours, sizes and states with sizes and states; '' = never swapped
    (places: "a blue grass swimming on five cats" is no scene; words no table knows)."""
    if group == "adj":
        word = SPELLINGS.get(lemma, lemma)
        return "size" if word in SIZE_ADJECTIVES else _ADJECTIVE_CLASS.get(word, "")
    spaced = lemma.replace("_", " ")
    if spaced in _PERSONS or spaced.rsplit(" ", 1)[-1] in _PERSONS:
        return "person"
    category = lexicon.noun_category(lemma)
    if category == "place":
        return ""
    if category == "noun.person":
        return "person"
    noun_group = lexicon.noun_group(lemma)
    if noun_group in _VEHICLES:
        return "vehicle"
    if noun_group in ("bird", "pet", "large animal"):
        return "animal"
    return noun_group  # things swap within their category: "a kitchen table with candles on a cake" is no scene


def swap_pairs(caption: str, parse: Parse, lexicon: Any) -> list[Pair]:
    """Every pair of same-group, same-class spans with different texts and different owners, in parse order."""
    by_group: dict[str, list[tuple[int, int, int, str]]] = {}
    for group, start, end, owner, lemma in parse.swaps:
        cls = swap_class(group, lemma, lexicon)
        if cls:
            by_group.setdefault(group, []).append((start, end, owner, cls))
    pairs: list[Pair] = []
    for group, spans in by_group.items():
        kind = GROUP_KIND[group]
        for i, (s1, e1, o1, c1) in enumerate(spans):
            text_a = caption[s1:e1].casefold()
            for s2, e2, o2, c2 in spans[i + 1:]:
                if o1 == o2 or c1 != c2 or not (e1 <= s2 or e2 <= s1):
                    continue
                if caption[s2:e2].casefold() != text_a:
                    a, b = (s1, e1), (s2, e2)
                    pairs.append((kind, a, b) if a[0] < b[0] else (kind, b, a))
    return pairs


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
