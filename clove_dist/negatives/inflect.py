"""Surface forms: a replacement word takes the old word's inflection, casing and indefinite article.

    inflect("stand", "VBG")            -> "standing"      (tense and number from the Penn tag of the old word)
    inflect("living room", "NNS")      -> "living rooms"  (a noun phrase inflects its last word, a verb its first)
    match_case("Dogs", "cats")         -> "Cats"
    fix_article("I saw an ", "zebra")  -> "I saw a "

Inflection uses lemminflect (its look-ups cost about 35 us, so they are cached per process). Lemmas of caption
words come from lemminflect too, since spaCy's lemmatizer is disabled for speed, and so does the vocabulary check
that tells English captions from others: the parse needs spaCy and lemminflect, never WordNet.
"""
from __future__ import annotations

import functools
import re

# Penn tags whose form lemminflect can produce; any other tag keeps the dictionary form.
INFLECTED_TAGS = frozenset({"NN", "NNS", "VB", "VBD", "VBG", "VBN", "VBP", "VBZ", "JJ", "JJR", "JJS"})
_UPOS = {"N": "NOUN", "V": "VERB", "J": "ADJ"}

# Vowel letters that sound like a consonant ("a unicorn", "a one-way street"), and silent h ("an hour").
_A_BEFORE_VOWEL = ("uni", "use", "usu", "ura", "uro", "eu", "one", "once", "ubi", "uti", "uk")
_AN_BEFORE_H = ("hour", "honest", "honor", "honour", "heir")
_ARTICLE_TAIL = re.compile(r"(?:^|(?<=\W))(a|an|A|An|AN)(\s+)$")


@functools.lru_cache(maxsize=65536)
def lemma_of(word: str, tag: str) -> str:
    """Dictionary form of a caption word (lowercased) for its Penn tag; the word itself when unknown."""
    low = word.lower()
    upos = _UPOS.get(tag[:1])
    if upos is None:
        return low
    import lemminflect  # imports spaCy: deferred so that importing clove_dist.negatives stays cheap
    found = lemminflect.getLemma(low, upos=upos)
    return found[0] if found else low


@functools.lru_cache(maxsize=65536)
def is_english_word(word: str) -> bool:
    """Whether lemminflect's English lexicon (about 90k words) knows `word` in any part of speech."""
    import lemminflect
    return bool(lemminflect.getAllLemmas(word.lower()))


@functools.lru_cache(maxsize=65536)
def inflect(phrase: str, tag: str) -> str:
    """`phrase` (dictionary form, words joined by spaces) inflected to the Penn `tag`: a verb phrase on its first
    word (look at -> looking at), a noun phrase on its last (living room -> living rooms)."""
    if tag not in INFLECTED_TAGS or tag in ("NN", "VB", "JJ"):
        return phrase
    import lemminflect
    if tag.startswith("VB"):
        word, _, rest = phrase.partition(" ")
        forms = lemminflect.getInflection(word, tag=tag)
        return (f"{forms[0]} {rest}" if rest else forms[0]) if forms else phrase
    head, _, last = phrase.rpartition(" ")
    forms = lemminflect.getInflection(last, tag=tag)
    return (f"{head} {forms[0]}" if head else forms[0]) if forms else phrase


def match_case(old: str, new: str) -> str:
    """Give `new` the casing pattern of `old`: ALL CAPS, Capitalised, or as is."""
    if len(old) > 1 and old.isupper():
        return new.upper()
    if old[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def wants_an(word: str) -> bool:
    """Whether the indefinite article before `word` is 'an' (by spelling; good for caption vocabulary)."""
    low = word.lower()
    if not low:
        return False
    if low[0].isdigit():
        return low.startswith(("8", "11", "18"))
    if low.startswith(_AN_BEFORE_H):
        return True
    if low.startswith(_A_BEFORE_VOWEL):
        return False
    return low[0] in "aeiou"


def fix_article(before: str, new_word: str) -> str:
    """Rewrite a trailing 'a'/'an' of `before` (the text just before the new word) to agree with `new_word`."""
    m = _ARTICLE_TAIL.search(before)
    if m is None:
        return before
    article = m.group(1)
    right = "an" if wants_an(new_word) else "a"
    if article.lower() == right:
        return before
    if len(article) > 1 and article.isupper():
        right = right.upper()
    elif article[0].isupper():
        right = right.capitalize()
    return before[: m.start(1)] + right + m.group(2)
