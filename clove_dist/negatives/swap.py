"""NegCLIP-style SWAP negatives: two words or phrases of the same kind change places.

    pairs = swap_pairs(caption, parse)        # [(kind, (start, end), (start, end)), ...]
    text, kind, old, new = draw(caption, pairs, rng)

Kinds, from the spaCy parse (parse.py): two singular or two plural entity nouns (`swap-noun`, compounds such as
"fire hydrant" move whole, and number agreement holds), two adjectives (`swap-adjective`), two noun phrases of two
or more words (`swap-phrase`):
"a white dog chasing a black cat" -> "a black dog chasing a white cat" / "a black cat chasing a white dog".
Pairs whose texts are equal (case-folded) or whose spans overlap are left out, and so is a swap that puts a word
twice in a row ("a small small square"). A sentence-initial capital stays at
the start of the sentence, and an "a"/"an" before either span is corrected. `old` is the first span's text,
`new` the text that took its place.
"""
from __future__ import annotations

import re
from typing import Any

from .inflect import fix_article
from .parse import Parse

GROUP_KIND = {"noun-sg": "swap-noun", "noun-pl": "swap-noun", "adj": "swap-adjective", "np": "swap-phrase"}

Pair = tuple[str, tuple[int, int], tuple[int, int]]
_DOUBLED = re.compile(r"\b(\w+) \1\b", re.IGNORECASE)


def swap_pairs(caption: str, parse: Parse) -> list[Pair]:
    """Every pair of same-group spans with different texts, in parse order."""
    by_group: dict[str, list[tuple[int, int]]] = {}
    for group, start, end in parse.swaps:
        by_group.setdefault(group, []).append((start, end))
    pairs: list[Pair] = []
    for group, spans in by_group.items():
        kind = GROUP_KIND[group]
        for i, a in enumerate(spans):
            text_a = caption[a[0]:a[1]].casefold()
            for b in spans[i + 1:]:
                if a[1] <= b[0] or b[1] <= a[0]:
                    if caption[b[0]:b[1]].casefold() != text_a:
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
