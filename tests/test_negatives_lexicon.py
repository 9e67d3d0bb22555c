"""WordNet side of REPLACE: where WordNet is found, and what the candidate tables hold.

Everything runs on the real WordNet (NLTK data or Debian's wordnet-base); facts are checked against NLTK's own
reader directly, not against the code under test.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from clove_dist.negatives import lexicon as lexmod
from clove_dist.negatives.lexicon import Lexicon, WordNetMissing, lexnames_text, locate_wordnet


@pytest.fixture(scope="module")
def lex() -> Lexicon:
    return Lexicon()


def synsets_of(lex: Lexicon, word: str) -> set:
    return set(lex.wn.synsets(word.replace(" ", "_")))


COLOURS = {"red", "blue", "green", "white", "black", "yellow", "brown", "orange", "pink", "gray", "grey", "purple",
           "violet", "tan", "beige", "olive", "chromatic", "achromatic", "pale", "dark", "light"}


def test_lexnames_match_the_manual_page():
    text = lexnames_text()
    lines = text.splitlines()
    assert len(lines) == 45
    assert lines[0] == "00\tadj.all\t3" and lines[5] == "05\tnoun.animal\t1" and lines[44] == "44\tadj.ppl\t3"
    man = Path("/usr/share/man/man5/lexnames.5WN.gz")
    if not man.is_file():
        pytest.skip("lexnames(5WN) manual page not installed")
    page = gzip.open(man, "rt", errors="replace").read()
    for line in lines:  # each file number and name appears in the manual's table
        number, name, _ = line.split("\t")
        assert f"{number}\t{name}" in page or f"{number} {name}" in page.replace("\t", " "), line


def test_configured_path_wins_and_gains_lexnames(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = tmp_path / "dict"
    src.mkdir()
    for name in ("data.noun", "index.noun"):
        (src / name).write_text("  1 test\n")
    root, where = locate_wordnet(str(src))
    assert str(src) in where
    assert (root / "lexnames").read_text() == lexnames_text()
    assert (root / "data.noun").read_text() == "  1 test\n"
    again, _ = locate_wordnet(str(src))  # the cached copy is reused, not rebuilt
    assert again == root


def test_unwritable_cache_falls_back_to_the_temp_directory(tmp_path, monkeypatch):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.setattr(lexmod.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    src = tmp_path / "dict"
    src.mkdir()
    for name in ("data.noun", "index.noun"):
        (src / name).write_text("  1 test\n")
    root, _ = locate_wordnet(str(src))
    assert root.parent.parent == tmp_path / "tmp" and (root / "lexnames").is_file()


def test_nltk_data_comes_before_debian(tmp_path, monkeypatch):
    import nltk.data
    corpus = tmp_path / "corpora" / "wordnet"
    corpus.mkdir(parents=True)
    for name in ("data.noun", "index.noun", "lexnames"):
        (corpus / name).write_text("x\n")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)] + list(nltk.data.path))
    root, where = locate_wordnet("")
    assert "NLTK" in where and str(root.path if hasattr(root, "path") else root).startswith(str(corpus))


def test_configured_path_without_wordnet_is_one_error_line(tmp_path):
    with pytest.raises(WordNetMissing) as err:
        locate_wordnet(str(tmp_path / "nowhere"))
    msg = str(err.value)
    assert "\n" not in msg and "negatives.wordnet_path" in msg and "apt-get install wordnet-base" in msg


def test_missing_wordnet_names_the_install_command(tmp_path, monkeypatch):
    import nltk.data
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    monkeypatch.setattr(lexmod, "DEBIAN_WORDNET", str(tmp_path / "no-wordnet"))
    with pytest.raises(WordNetMissing) as err:
        locate_wordnet("")
    assert "apt-get install wordnet-base" in str(err.value) and "\n" not in str(err.value)


def test_colours_map_to_colours(lex):
    for colour in ("red", "green", "white"):
        table = lex.table(colour, "a")
        assert table is not None
        top = table.words[:6]
        assert set(top) <= COLOURS, (colour, top)
        assert colour not in table.words


def test_antonyms_are_candidates(lex):
    assert "large" in lex.table("small", "a").words
    assert "stand" in lex.table("sit", "v").words
    assert "small" in lex.table("huge", "a").words  # a satellite reaches its head's antonym


def test_candidates_share_the_caption_category(lex):
    """Nouns are read in the sense captions mean and replaced within their everyday category."""
    from clove_dist.negatives.caption_words import NOUN_GROUPS
    assert lex.noun_sense("plate").name() == "plate.n.04"  # a dish, not home plate
    assert lex.noun_sense("field").lexname() == "noun.location" and lex.table("field", "n") is None
    assert lex.table("person", "n") is None and lex.table("people", "n") is None
    table = lex.table("dog", "n")
    assert "cat" in table.words and set(table.words) <= set(NOUN_GROUPS["pet"])
    for word in lex.table("car", "n").words:
        sense = lex.noun_sense(word)
        assert sense.lexname() == "noun.artifact" and word in NOUN_GROUPS["road vehicle"]
    # a hypernym or a hyponym may still be true of the picture: never a candidate
    car = lex.wn.synset("car.n.01")
    for word in lex.table("car", "n").words:
        other = lex.noun_sense(word)
        assert other not in car.closure(lambda s: s.hypernyms())
        assert car not in other.closure(lambda s: s.hypernyms())


@pytest.mark.parametrize("word,pos", [("dog", "n"), ("man", "n"), ("car", "n"), ("bench", "n"), ("ride", "v"),
                                      ("hold", "v"), ("red", "a"), ("small", "a"), ("old", "a"), ("big", "a")])
def test_never_a_synonym(lex, word, pos):
    table = lex.table(word, pos)
    assert table is not None
    # verbs in their everyday (first) sense: "hold" and "throw" share only "hold / throw a party"
    own = set(lex.wn.synsets(word, "v")[:1]) if pos == "v" else synsets_of(lex, word)
    for cand in table.words:
        other = set(lex.wn.synsets(cand, "v")[:1]) if pos == "v" else synsets_of(lex, cand)
        assert not (own & other), (word, cand)
        assert cand.lower() != word


def test_frequency_weighting(lex):
    """Without a corpus vocabulary a candidate weighs its noun count in WordNet's tagged corpus, plus one."""
    table = lex.table("car", "n")
    weights = [b - a for a, b in zip((0,) + table.cum[:-1], table.cum)]
    assert weights == sorted(weights, reverse=True)  # stored heaviest first
    assert table.total == table.cum[-1] == sum(weights)
    for word, weight in zip(table.words, weights):  # NLTK's own (slow) count, read independently
        assert weight == sum(l.count() for l in lex.wn.lemmas(word.replace(" ", "_"), "n")) + 1, word
    assert weights[table.words.index("truck")] > 5 * weights[table.words.index("van")]


def test_corpus_vocabulary_decides(lex):
    vocab = {"dog": 50, "cat": 40, "horse": 9, "kitten": 2, "zebra": 30}
    corpus = Lexicon(vocabulary=vocab, min_corpus_count=5)
    table = corpus.table("dog", "n")
    assert table.words == ("cat",)  # kitten is too rare here, horse and zebra are of another category
    assert corpus.table("horse", "n") is None  # no other mount the corpus uses; a zebra is of another category
    loose = Lexicon(vocabulary=vocab, min_corpus_count=1).table("dog", "n")
    assert loose.words == ("cat", "kitten") and loose.cum == (40, 42)  # weighted by corpus count


def test_tables_are_deterministic_and_cached(lex):
    fresh = Lexicon()
    for word, pos in (("woman", "n"), ("blue", "a"), ("walk", "v")):
        assert fresh.table(word, pos) == lex.table(word, pos)
    assert lex.table("woman", "n") is lex.table("woman", "n")
    assert lex.table("qwzxv", "n") is None


def test_every_sense_pools_more_candidates(lex):
    """max_senses limits the WordNet senses whose antonyms an adjective outside the tables takes."""
    everything = Lexicon(max_senses=0)
    first = set(lex.table("light", "a").words)
    pooled = set(everything.table("light", "a").words)
    assert first == {"heavy"} and first < pooled and "dark" in pooled


def test_candidates_are_plain_words(lex):
    for word, pos in (("horse", "n"), ("giraffe", "n"), ("pizza", "n")):
        for cand in lex.table(word, pos).words:
            assert cand == cand.lower() and len(cand.split()) <= 3 and not any(c.isdigit() for c in cand), cand


def test_lexicon_pickles_without_wordnet(lex):
    import pickle
    blob = pickle.dumps(lex)
    assert len(blob) < 500  # the reader and caches stay behind; each process loads its own
    clone = pickle.loads(blob)
    assert clone.max_senses == lex.max_senses and clone.table("cat", "n") == lex.table("cat", "n")


def test_counts_are_loaded_once(lex):
    lex.table("cat", "n")
    assert len(lex._counts) > 30000  # cntlist.rev: ~37k sense keys, read into a dict, not per look-up
