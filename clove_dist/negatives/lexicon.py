"""Candidate tables for REPLACE negatives: WordNet senses and antonyms, everyday categories, corpus frequency.

    lex = Lexicon(wordnet_path="", max_senses=1, vocabulary=None, min_corpus_count=5)
    table = lex.table("dog", "n")      # Table(words=('cat', 'kitten'), cum=(...)) or None

Where WordNet comes from, first match wins:
1. `negatives.wordnet_path` when set (a directory of WordNet dict files: data.noun, index.noun, ...);
2. NLTK's data (`python -m nltk.downloader wordnet`);
3. Debian's `wordnet-base` under /usr/share/wordnet.
Debian's package lacks the `lexnames` file that NLTK's reader opens, and NLTK refuses symlinks that leave a data
root, so such a directory is copied once (28 MB) into ~/.cache/clove-dist/ with the 45-line lexnames table of
lexnames(5WN) added. Nothing found is one error line naming the install command.

Candidates for a word (issue 11: CLoVe's WordNet co-hyponyms, read one by one, were mostly not usable: "plate" ->
"second base", "people" -> "knowledges", "tree" -> "scorzonera", "standing" -> "rising"):
- nouns: the sense captions mean (caption_words.SENSE_OVERRIDES, else the first sense in a concrete
  lexicographer file: artifact, animal, person, food, plant, object, body, substance, location); replaced by
  another word of the same everyday category (caption_words.NOUN_GROUPS; a word outside the lists joins a
  category through its hypernyms, CATEGORY_ANCHORS), never by a hypernym or hyponym of that sense; places,
  abstractions and person nouns outside PERSON_GROUPS get no candidate;
- adjectives: colours, materials by class, size, age, state... by their opposites (caption_words tables); any
  other adjective takes WordNet's direct antonyms (a satellite also its head's: huge -> large -> small) over the
  first `max_senses` senses (0 = every sense, as CLoVe pools them);
- verbs: only by frame (caption_words.VERB_FRAMES): table(lemma, "v") with a direct object, "vi" without;
- never a synonym: a candidate sharing a synset with the word is dropped;
- weights: with a corpus vocabulary (vocabulary.py) the candidate's count in the captions, and candidates under
  `min_corpus_count` are dropped; without one, its noun count in WordNet's tagged corpus (cntlist.rev) plus one
  (WordNet antonyms need a count of at least one: no rare taxa).
`Lemma.count()` re-reads cntlist.rev on every call (about 245 ms per new word), so the file is loaded into a dict
once. Tables are cached per process (bounded); a word's first look-up costs about 1-20 ms.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import UserError
from .caption_words import (ADJECTIVE_CLASSES, ADJECTIVE_OPPOSITES, CATEGORY_ANCHORS, GENERIC_NOUNS, INTRANSITIVE_OK,
                            INVARIANT_PLURALS, NOT_ADJECTIVES, NOUN_GROUPS, PERSON_GROUPS, PLACE_NOUNS, SAME_THING_OF,
                            SENSE_OVERRIDES, SPELLINGS, TRANSITIVE, VERB_FRAMES, persons_differ)

DEBIAN_WORDNET = "/usr/share/wordnet"
INSTALL_HINT = "install it with `apt-get install wordnet-base` (or `python -m nltk.downloader wordnet`)"

# lexnames(5WN): file number, name, syntactic category (1 noun, 2 verb, 3 adjective, 4 adverb), in file order.
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation "
    "noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception "
    "verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_DICT_FILES = ("data.noun", "data.verb", "data.adj", "data.adv", "index.noun", "index.verb", "index.adj",
               "index.adv", "noun.exc", "verb.exc", "adj.exc", "adv.exc", "cntlist.rev")

PER_ELEMENT = 2  # candidates a caption element stands for at most (CLoVe's n_choices_per_graph_element)
MAX_TABLES = 50_000  # cached (word, pos) tables per process before the oldest half is dropped
# Lexicographer files of things one can see; a caption's head noun is read in the first sense from one of them.
CONCRETE_NOUN_FILES = frozenset({"noun.artifact", "noun.animal", "noun.person", "noun.food", "noun.plant",
                                 "noun.object", "noun.body", "noun.substance", "noun.location"})
# Of those, the files whose co-hyponyms make a false caption (persons come from caption_words.PERSON_GROUPS).
REPLACEABLE_NOUN_FILES = frozenset({"noun.artifact", "noun.animal", "noun.food", "noun.plant"})
_GROUP_OF = {w: g for g, words in NOUN_GROUPS.items() for w in words}
_PLAIN = re.compile(r"[a-z][a-z'\-]*(?:_[a-z][a-z'\-]*){0,2}")  # lowercase, at most three words


class WordNetMissing(UserError):
    """WordNet data cannot be found or read; the message names the install command."""


def lexnames_text() -> str:
    """The lexnames file NLTK's reader expects: one `NN<TAB>name<TAB>category` line per lexicographer file."""
    return "".join(f"{i:02d}\t{name}\t{_CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(_LEXNAMES))


def _has_dict_files(path: Path) -> bool:
    return (path / "data.noun").is_file() and (path / "index.noun").is_file()


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clove-dist"


def _copy_with_lexnames(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=dest.parent))
    try:
        for name in _DICT_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        (tmp / "lexnames").write_text(lexnames_text())
        try:
            os.rename(tmp, dest)  # atomic; another process may have won the race, which is as good
        except OSError:
            if not (dest / "lexnames").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _with_lexnames(src: Path) -> Path:
    """A directory NLTK can open: `src` itself when it has lexnames, else a cached copy with lexnames added (in
    ~/.cache/clove-dist, or the temp directory when that is not writable)."""
    if (src / "lexnames").is_file():
        return src
    stamp = int((src / "data.noun").stat().st_mtime)
    name = f"wordnet-{hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:10]}-{stamp}"
    fallback = Path(tempfile.gettempdir()) / f"clove-dist-{os.getuid() if hasattr(os, 'getuid') else 0}"
    errors = []
    for root in (_cache_root(), fallback):
        dest = root / name
        if (dest / "lexnames").is_file():
            return dest
        try:
            _copy_with_lexnames(src, dest)
            return dest
        except OSError as e:
            errors.append(f"{root}: {e.strerror or e}")
    raise WordNetMissing(f"WordNet at {src} lacks lexnames and no copy with it can be written ({'; '.join(errors)}); "
                         "set negatives.wordnet_path to a WordNet directory that has lexnames")


def locate_wordnet(configured: str = "") -> tuple[Any, str]:
    """(root NLTK's reader can open, description). A configured path wins; WordNetMissing when none is found."""
    if configured:
        path = Path(configured).expanduser()
        if not _has_dict_files(path):
            raise WordNetMissing(f"negatives.wordnet_path: {configured!r} holds no WordNet dict files "
                                 f"(data.noun, index.noun); {INSTALL_HINT}")
        return _with_lexnames(path), f"WordNet from {path}"
    import nltk.data
    for resource in ("corpora/wordnet", "corpora/wordnet.zip/wordnet/"):
        try:
            return nltk.data.find(resource), "WordNet from NLTK data"
        except LookupError:
            pass
    if _has_dict_files(Path(DEBIAN_WORDNET)):
        return _with_lexnames(Path(DEBIAN_WORDNET)), f"WordNet from {DEBIAN_WORDNET}"
    raise WordNetMissing(f"WordNet not found (no NLTK data, no {DEBIAN_WORDNET}): {INSTALL_HINT}, "
                         "or set negatives.wordnet_path")


def open_wordnet(configured: str = "") -> Any:
    """An NLTK WordNetCorpusReader over the located data (about 3 s: NLTK indexes every lemma)."""
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class EnglishWordNet(WordNetCorpusReader):
        def map_wn(self, version: str = "wordnet") -> None:
            return None  # the mapping only serves multilingual look-ups, and needs NLTK's copy to compare with

    root, _ = locate_wordnet(configured)
    if isinstance(root, Path):
        resolved = str(root.resolve())
        if resolved not in nltk.data.path:
            nltk.data.path.append(resolved)  # NLTK only opens files under its data roots
        root = resolved
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": not used here
        try:
            return EnglishWordNet(root, None)
        except (OSError, ValueError, AssertionError) as e:
            raise WordNetMissing(f"WordNet at {root} cannot be read ({type(e).__name__}: {e}); {INSTALL_HINT}") \
                from None


_OPENED: dict[str, tuple[Any, dict[str, int]]] = {}
_OPEN_LOCK = threading.Lock()


def shared_wordnet(configured: str = "") -> tuple[Any, dict[str, int]]:
    """(reader, sense-key counts), opened once per process and path and shared by every Lexicon."""
    with _OPEN_LOCK:
        if configured not in _OPENED:
            reader = open_wordnet(configured)
            _OPENED[configured] = (reader, load_counts(reader))
        return _OPENED[configured]


def load_counts(reader: Any) -> dict[str, int]:
    """Sense key -> tagged-corpus count, from cntlist.rev (empty, with a warning, when the file is absent)."""
    counts: dict[str, int] = {}
    try:
        fp = reader.open("cntlist.rev")
    except (OSError, LookupError, ValueError):
        warnings.warn("WordNet has no cntlist.rev: every REPLACE candidate weighs the same")
        return counts
    with fp:
        for line in fp:
            parts = line.split()
            if len(parts) == 3 and parts[2].isdigit():
                counts[parts[0]] = counts.get(parts[0], 0) + int(parts[2])
    return counts


@dataclass(frozen=True)
class Table:
    """Replacement candidates of one word: display words (spaces, not underscores) and cumulative weights."""
    words: tuple[str, ...]
    cum: tuple[int, ...]
    total: int  # cum[-1]
    weight: int  # how much the element this table serves weighs in a draw: min(PER_ELEMENT, len(words))


def make_table(weights: dict[str, int]) -> Table | None:
    """Deterministic order (heaviest first, then alphabetical), whatever order the weights were found in."""
    if not weights:
        return None
    words = sorted(weights, key=lambda w: (-weights[w], w))
    cum, acc = [], 0
    for w in words:
        acc += weights[w]
        cum.append(acc)
    return Table(tuple(w.replace("_", " ") for w in words), tuple(cum), acc, min(PER_ELEMENT, len(words)))


def keep_words(table: Table, keep: Callable[[str], bool]) -> Table | None:
    """The candidates of `table` for which keep(word) holds, with their weights; None when none is left."""
    return make_table({w.replace(" ", "_"): c - p for w, c, p in zip(table.words, table.cum, (0,) + table.cum)
                       if keep(w)})


class Lexicon:
    """Cached candidate tables; loads WordNet on first use, so it pickles cheaply into worker processes.

    `vocabulary` (lemma -> count in the training captions, from `clove-dist negatives`) makes the corpus decide:
    a candidate must occur at least `min_corpus_count` times and weighs its count. Without one, WordNet candidates
    must have been seen at least once in WordNet's tagged corpus (cntlist.rev) and weigh that count.
    """

    def __init__(self, wordnet_path: str = "", max_senses: int = 1, vocabulary: dict[str, int] | None = None,
                 min_corpus_count: int = 1) -> None:
        self.wordnet_path = wordnet_path
        self.max_senses = max_senses
        self.vocabulary = vocabulary
        self.min_corpus_count = min_corpus_count
        self._wn: Any = None
        self._counts: dict[str, int] = {}
        self._tables: dict[tuple[str, str], Table | None] = {}
        self._senses: dict[str, Any] = {}
        self._word_counts: dict[str, int] = {}
        self._vocab_groups: dict[str, tuple[str, ...]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"wordnet_path": self.wordnet_path, "max_senses": self.max_senses, "vocabulary": self.vocabulary,
                "min_corpus_count": self.min_corpus_count}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    @property
    def wn(self) -> Any:
        if self._wn is None:
            self._wn, self._counts = shared_wordnet(self.wordnet_path)
        return self._wn

    def table(self, lemma: str, pos: str) -> Table | None:
        """Candidates replacing `lemma` ('_' joins words) as a noun 'n', verb 'v' (with an object; 'vi' without)
        or adjective 'a'; None if none."""
        key = (lemma, pos)
        try:
            return self._tables[key]
        except KeyError:
            pass
        table = make_table(self._weights(lemma, pos))
        if len(self._tables) >= MAX_TABLES:
            for old in list(self._tables)[: MAX_TABLES // 2]:
                del self._tables[old]
        self._tables[key] = table
        return table

    # -- senses ------------------------------------------------------------------------------------------------

    def noun_sense(self, lemma: str) -> Any:
        """The synset a caption means by `lemma`: the override table's, else the first sense in a concrete
        lexicographer file (a caption's head noun names something one can see); None when there is none."""
        hit = self._senses.get(lemma, False)
        if hit is not False:
            return hit
        low = lemma.lower()
        sense = None
        if low in SENSE_OVERRIDES:
            sense = self.wn.synset(SENSE_OVERRIDES[low])
        else:
            for synset in self.wn.synsets(low, "n"):
                if synset.lexname() in CONCRETE_NOUN_FILES:
                    sense = synset
                    break
        self._senses[lemma] = sense
        return sense

    def noun_category(self, lemma: str) -> str:
        """'thing' for NOUN_GROUPS words, 'place' for grounds and rooms, else the lexicographer file of the caption
        sense ('' when none)."""
        low = lemma.lower().replace(" ", "_")
        if low.replace("_", " ") in _GROUP_OF:
            return "thing"  # a listed everyday thing ("square" the shape, not the town square)
        if low in PLACE_NOUNS or low.rsplit("_", 1)[-1] in PLACE_NOUNS:
            return "place"
        sense = self.noun_sense(low)
        if sense is None:
            return ""
        name = sense.lexname()
        return "place" if name in ("noun.location", "noun.object") else name

    def word_count(self, word: str, pos: str | None = None) -> int:
        """How often `word` occurs: in the corpus vocabulary when there is one, else in WordNet's tagged corpus."""
        if self.vocabulary is not None:
            return self.vocabulary.get(word.replace("_", " ").lower(), 0)
        hit = self._word_counts.get(word + str(pos))
        if hit is None:
            wn = self.wn
            hit = sum(self._counts.get(l.key(), 0) for l in wn.lemmas(word.replace(" ", "_"), pos))
            self._word_counts[word + str(pos)] = hit
        return hit

    def _frequent(self, word: str, curated: bool, pos: str | None = None) -> int:
        """The weight of candidate `word`, 0 when it is too rare: curated words pass without a vocabulary."""
        count = self.word_count(word, pos)
        if self.vocabulary is not None:
            return count if count >= self.min_corpus_count else 0
        if curated:
            return count + 1
        return count if count >= 1 else 0

    # -- candidate search ------------------------------------------------------------------------------------

    def _curated(self, words: Any, exclude: str, pos: str | None = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for word in words:
            if word != exclude:
                weight = self._frequent(word, curated=True, pos=pos)
                if weight:
                    out[word.replace(" ", "_")] = weight
        return out

    def _weights(self, lemma: str, pos: str) -> dict[str, int]:
        low = SPELLINGS.get(lemma.lower(), lemma.lower())
        spaced = low.replace("_", " ")
        if pos == "n":
            return self._noun_weights(low, spaced)
        if pos in ("v", "vi"):
            options = VERB_FRAMES.get(low, ())
            if pos == "vi":
                options = tuple(w for w in options if w not in TRANSITIVE or w in INTRANSITIVE_OK)
            return self._curated(options, low, "v")
        if low in NOT_ADJECTIVES:
            return {}
        for group in ADJECTIVE_CLASSES:
            if low in group:
                return self._curated(group, low, "a")
        if low in ADJECTIVE_OPPOSITES:
            return self._curated(ADJECTIVE_OPPOSITES[low], low, "a")
        wn = self.wn
        found: dict[str, int] = {}
        senses = wn.synsets(low, "a")
        for synset in senses[: self.max_senses] if self.max_senses else senses:
            heads = [synset] + (synset.similar_tos() if synset.pos() == "s" else [])
            for head in heads:
                for name in self._antonyms(head):
                    weight = self._frequent(name, curated=False, pos="a")
                    if weight and _PLAIN.fullmatch(name) and name.lower() != low:
                        found[name] = weight
        return found

    def noun_group(self, lemma: str) -> str:
        """The NOUN_GROUPS category of a noun: listed there, or through the first CATEGORY_ANCHORS hypernym."""
        spaced = lemma.lower().replace("_", " ")
        if spaced in _GROUP_OF:
            return _GROUP_OF[spaced]
        if spaced.replace(" ", "_") in PLACE_NOUNS:
            return ""  # grounds and rooms: "in the grass" -> "in the tree" is no scene
        sense = self.noun_sense(lemma)
        if sense is None or sense.lexname() not in REPLACEABLE_NOUN_FILES:
            return ""
        above = {s.name() for s in sense.closure(lambda s: s.hypernyms())}
        for anchor, group in CATEGORY_ANCHORS:
            if anchor in above:
                return group
        return ""

    def _group_words(self, group: str) -> tuple[str, ...]:
        """Candidate words of a category: the listed ones, and with a vocabulary its frequent nouns too."""
        if self.vocabulary is None:
            return NOUN_GROUPS[group]
        if self._vocab_groups is None:
            found: dict[str, list[str]] = {g: list(words) for g, words in NOUN_GROUPS.items()}
            for word, count in self.vocabulary.items():
                if count >= self.min_corpus_count and word not in _GROUP_OF and word.replace(" ", "").isalpha():
                    g = self.noun_group(word) if self.wn.synsets(word.replace(" ", "_"), "n") else ""
                    if g:
                        found[g].append(word)
            self._vocab_groups = {g: tuple(words) for g, words in found.items()}
        return self._vocab_groups[group]

    def _noun_weights(self, low: str, spaced: str) -> dict[str, int]:
        for group in PERSON_GROUPS:
            if spaced in group:
                return self._curated([w for w in group if persons_differ(spaced, w)], spaced, "n")
        if spaced in INVARIANT_PLURALS:
            return {}
        group = self.noun_group(low)
        if not group:
            return {}  # person nouns outside the groups, places, abstractions: no candidate is surely false
        sense = self.noun_sense(low)
        above = set(sense.closure(lambda s: s.hypernyms())) if sense is not None else set()
        wn = self.wn
        synonyms = {name.lower() for s in wn.synsets(low, "n") for name in s.lemma_names()}
        synonyms.add(low)
        found: dict[str, int] = {}
        same = SAME_THING_OF.get(spaced, ())
        for word in self._group_words(GENERIC_NOUNS.get(spaced, group)):
            key = word.replace(" ", "_")
            if key in synonyms or word == spaced or word in same:
                continue
            other = self.noun_sense(key)
            if other is not None and sense is not None and (
                    other in above or sense in other.closure(lambda s: s.hypernyms())):
                continue  # a hypernym ("animal") or hyponym ("puppy" for "dog") may still be true of the picture
            weight = self._frequent(word, curated=True, pos="n")
            if weight:
                found[key] = weight
        return found

    def _antonyms(self, synset: Any) -> Iterator[str]:
        for lemma in synset.lemmas():
            for ant in lemma.antonyms():
                yield ant.name()
