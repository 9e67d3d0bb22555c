"""The four word-order perturbations of ARO's COCO-Order and Flickr30k-Order (Yuksekgonul et al., 2023).

    p = OrderPerturber(seed=0)
    options = p.options("A man riding a brown horse.", stream="coco/0/0")   # [true, 4 perturbations]

For each caption the benchmark builds five options: the caption itself and

  1. nouns shuffled among nouns and adjectives among adjectives (spaCy tags NN NNS NNP NNPS / JJ JJR JJS),
  2. every other token shuffled, nouns and adjectives kept in place,
  3. the tokens shuffled within each consecutive trigram,
  4. the trigrams shuffled as units,

each joined with single spaces and then normalised with the benchmark's pre_caption (lower-case, the characters
. ! " ( ) * # : ; ~ replaced by spaces, runs of whitespace collapsed, cut to 30 words). Perturbations 1-2 use
spaCy's English tagger (en_core_web_sm, as the benchmark does), 3-4 NLTK's word tokenizer.

Randomness: the benchmark draws from the global numpy/random state seeded once, so its perturbations depend on the
order in which captions are processed. Here every caption has its own generator seeded from (seed, stream,
perturbation), so the same caption gets the same options in any order, process or rank. NLTK's word_tokenize first
splits sentences with the Punkt model (a data download); captions are one sentence, so its word tokenizer alone
(NLTKWordTokenizer, no data files) is used.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence

NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
ADJ_TAGS = frozenset({"JJ", "JJR", "JJS"})
PERTURBATIONS: tuple[str, ...] = ("shuffle_nouns_and_adj", "shuffle_allbut_nouns_and_adj", "shuffle_within_trigrams",
                                  "shuffle_trigrams")
MAX_WORDS = 30  # the benchmark's max_words for both order sets


def pre_caption(caption: str, max_words: int = MAX_WORDS) -> str:
    """The benchmark's caption normalisation (from BLIP): lower-case, strip punctuation, collapse, truncate."""
    text = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    text = re.sub(r"\s{2,}", " ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else text


def _shuffle_positions(tokens: list[str], positions: Sequence[int], rng: random.Random) -> None:
    values = [tokens[i] for i in positions]
    rng.shuffle(values)
    for i, v in zip(positions, values):
        tokens[i] = v


def _trigrams(tokens: list[str]) -> list[list[str]]:
    return [tokens[i:i + 3] for i in range(0, len(tokens), 3)]


class OrderPerturber:
    """Builds the five options of a COCO-/Flickr30k-Order example; spaCy and NLTK are loaded on first use."""

    def __init__(self, seed: int = 0, spacy_model: str = "en_core_web_sm"):
        self.seed = seed
        self.spacy_model = spacy_model
        self._nlp = None
        self._word_tokenizer = None

    def _tags(self, captions: Sequence[str]) -> list[tuple[list[str], list[str]]]:
        if self._nlp is None:
            from ..negatives.parse import load_spacy
            self._nlp = load_spacy(self.spacy_model)
        return [([t.text for t in doc], [t.tag_ for t in doc]) for doc in self._nlp.pipe(captions, batch_size=256)]

    def _words(self, caption: str) -> list[str]:
        if self._word_tokenizer is None:
            from nltk.tokenize import NLTKWordTokenizer
            self._word_tokenizer = NLTKWordTokenizer()
        return self._word_tokenizer.tokenize(caption)

    def _rng(self, stream: str, perturbation: str) -> random.Random:
        # String seeds are hashed with SHA-512 by random.Random: independent of PYTHONHASHSEED.
        return random.Random(f"aro-order/{self.seed}/{stream}/{perturbation}")

    def options_many(self, captions: Sequence[str], streams: Sequence[str]) -> list[list[str]]:
        """[[true, p1, p2, p3, p4]] per caption, every option passed through pre_caption."""
        if len(captions) != len(streams):
            raise ValueError(f"{len(captions)} captions but {len(streams)} streams")
        out = []
        for caption, stream, (tokens, tags) in zip(captions, streams, self._tags(captions)):
            nouns = [i for i, t in enumerate(tags) if t in NOUN_TAGS]
            adjs = [i for i, t in enumerate(tags) if t in ADJ_TAGS]
            rest = [i for i, t in enumerate(tags) if t not in NOUN_TAGS and t not in ADJ_TAGS]
            p1 = list(tokens)
            rng = self._rng(stream, PERTURBATIONS[0])
            _shuffle_positions(p1, nouns, rng)
            _shuffle_positions(p1, adjs, rng)
            p2 = list(tokens)
            _shuffle_positions(p2, rest, self._rng(stream, PERTURBATIONS[1]))
            words = self._words(caption)
            rng = self._rng(stream, PERTURBATIONS[2])
            p3 = []
            for tri in _trigrams(words):
                rng.shuffle(tri)
                p3.append(" ".join(tri))
            tris = _trigrams(words)
            self._rng(stream, PERTURBATIONS[3]).shuffle(tris)
            p4 = [" ".join(t) for t in tris]
            out.append([pre_caption(caption)] + [pre_caption(" ".join(p)) for p in (p1, p2, p3, p4)])
        return out

    def options(self, caption: str, stream: str) -> list[str]:
        return self.options_many([caption], [stream])[0]


__all__ = ["OrderPerturber", "pre_caption", "PERTURBATIONS", "MAX_WORDS"]
