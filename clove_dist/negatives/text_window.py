"""The part of a caption the text encoder sees: an edit beyond it would leave the negative equal to its caption.

    end = window_end(caption, context_length=77)     # character offset; edits must end at or before it

CLIP's tokenizer keeps `context_length` tokens including its start and end tokens, so 75 tokens of text. A token
covers at least one non-space character, so a caption of at most 75 non-space characters always fits and costs
one `len`; longer ones are counted with open_clip's own tokenizer, word by word (its BPE never crosses
whitespace, so the word counts add up to the caption's), each word's count cached.
"""
from __future__ import annotations

import functools
import re
from typing import Any

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
