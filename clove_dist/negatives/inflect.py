"""Surface forms: a replacement word takes the old word's inflection, casing and indefinite article; and the part
of a caption the text encoder sees.

    inflect("stand", "VBG")            -> "standing"      (tense and number from the Penn tag of the old word)
    inflect("living room", "NNS")      -> "living rooms"  (a noun phrase inflects its last word, a verb its first)
    match_case("Dogs", "cats")         -> "Cats"
    fix_article("I saw an ", "zebra")  -> "I saw a "

Inflection uses lemminflect (its look-ups cost about 35 us, so they are cached per process). Lemmas of caption
words come from lemminflect too, since spaCy's lemmatizer is disabled for speed, and so does the vocabulary check
that tells English captions from others: the parse needs spaCy and lemminflect, never WordNet.

    window_end(caption, context_length=77)   -> character offset; an edit must end at or before it

An edit beyond the encoder's window would make a negative equal to its caption after truncation. CLIP's tokenizer
keeps `context_length` tokens including its start and end tokens, so 75 tokens of text. A token covers at least
one non-space character, so a caption of at most 75 non-space characters always fits and costs one `len`; longer
ones are counted with open_clip's own tokenizer word by word (its BPE never crosses whitespace, so the word counts
add up to the caption's), each word's count cached.
"""
from __future__ import annotations

import functools
import re
from typing import Any

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


# --- the text encoder's window ---------------------------------------------------------------------------------

_WORDS = re.compile(r"\S+")
_TOKENIZER: list[Any] = []


def _tokenizer() -> Any:
    if not _TOKENIZER:
        from open_clip.tokenizer import SimpleTokenizer
        _TOKENIZER.append(SimpleTokenizer())
    return _TOKENIZER[0]


@functools.lru_cache(maxsize=131072)
def num_tokens(word: str) -> int:
    """BPE tokens of one whitespace-free word, as open_clip's tokenizer counts them."""
    return len(_tokenizer().encode(word))


def window_end(caption: str, context_length: int) -> int:
    """Character offset after the last whole word the encoder sees (len(caption) when everything fits)."""
    budget = context_length - 2  # start and end tokens
    if context_length <= 0 or len(caption) - caption.count(" ") <= budget:
        return len(caption)
    used = 0
    end = 0
    for m in _WORDS.finditer(caption):
        used += num_tokens(m.group())
        if used > budget:
            return end
        end = m.end()
    return len(caption)
