"""Sidecars and `clove-dist negatives`: parse once over real tar shards, resume, skip, and give every worker the same
negatives as an in-process generator.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch.utils.data

from clove_dist.config import NegativesConfig
from clove_dist.negatives import build, load_sidecar, precompute, sidecar_path
from clove_dist.negatives.parse import Parse
from clove_dist.negatives.sidecar import SidecarWriter, header, read_partial

CAPTIONS = [
    "A man riding a red horse on the beach.", "Two dogs sitting in front of a car.", "A cat on top of a wooden table.",
    "A woman holding an umbrella in the rain.", "A plate of food with broccoli and rice.",
    "A giraffe standing next to a tall tree.", "A kitchen with a white stove and a black sink.",
    "A boy throwing a frisbee in a park.", "", "一只猫坐在桌子上", "A red bus driving down the street.",
    "Three zebras grazing in a field.",
]


def tiny_jpeg() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def write_shard(path, samples: list[dict]) -> None:
    """A webdataset tar in img2dataset's layout: {key}.jpg, {key}.txt, {key}.json (top_caption)."""
    jpg = tiny_jpeg()
    with tarfile.open(path, "w") as tar:
        for s in samples:
            files = {"jpg": jpg}
            if "txt" in s:
                files["txt"] = s["txt"].encode()
            if "json" in s:
                files["json"] = s["json"] if isinstance(s["json"], bytes) else json.dumps(s["json"]).encode()
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def make_shards(root, num_shards: int = 3, per_shard: int = 8) -> list[str]:
    paths = []
    for n in range(num_shards):
        samples = []
        for i in range(per_shard):
            idx = n * per_shard + i
            cap = CAPTIONS[idx % len(CAPTIONS)]
            samples.append({"key": f"{n:05d}{i:04d}", "txt": f"alt text {idx}",
                            "json": {"top_caption": cap, "key": f"{n:05d}{i:04d}"}})
        path = os.path.join(root, f"{n:05d}.tar")
        write_shard(path, samples)
        paths.append(path)
    return paths


def caption_of(sample_caption: str, alt: str) -> str:
    return sample_caption.strip() or alt  # what the pipeline reads: top_caption, else the alt-text


# --- sidecar files ---------------------------------------------------------------------------------------------

def test_sidecar_path():
    assert sidecar_path("/data/00042.tar") == "/data/00042.negparse.jsonl.gz"
    assert sidecar_path("/data/00042.tar", "/cache") == "/cache/00042.negparse.jsonl.gz"
    assert sidecar_path("shard.tar.gz") == "shard.negparse.jsonl.gz"


def test_round_trip_and_damaged_files(tmp_path):
    g = build(NegativesConfig())
    parses = dict(zip(("a", "b", "c"), g.parse_many(CAPTIONS[:3])))
    path = str(tmp_path / "x.negparse.jsonl.gz")
    assert load_sidecar(path) is None
    w = SidecarWriter(path, header("x.tar"))
    for k, p in parses.items():
        w.add(k, p)
    assert load_sidecar(path) is None  # nothing final until finish()
    w.finish(list(parses))
    assert load_sidecar(path) == parses and not os.path.exists(path + ".partial")

    blob = open(path, "rb").read()
    (tmp_path / "cut.gz").write_bytes(blob[: len(blob) // 2])  # a copy cut short
    assert load_sidecar(str(tmp_path / "cut.gz")) is None
    lines = gzip.decompress(blob).decode().splitlines()
    (tmp_path / "noend.gz").write_bytes(gzip.compress("\n".join(lines[:-1]).encode() + b"\n"))
    assert load_sidecar(str(tmp_path / "noend.gz")) is None  # no end line: incomplete
    (tmp_path / "other.gz").write_bytes(gzip.compress(b'{"format": "something-else"}\n'))
    assert load_sidecar(str(tmp_path / "other.gz")) is None


def test_partial_file_resumes_after_a_torn_line(tmp_path):
    g = build(NegativesConfig())
    p = g.parse(CAPTIONS[0])
    path = str(tmp_path / "s.negparse.jsonl.gz")
    w = SidecarWriter(path, header("s.tar"))
    w.add("k1", p)
    w.add("k2", p)
    w.flush()
    w.close()
    with open(path + ".partial", "a") as f:
        f.write('{"k": "k3", "p": ["ok", 12')  # killed mid-line
    head, done = read_partial(path + ".partial")
    assert head["shard"] == "s.tar" and list(done) == ["k1", "k2"]
    assert open(path + ".partial").read().endswith("\n")  # the torn piece is gone
    w = SidecarWriter(path, header("s.tar"))
    assert list(w.done) == ["k1", "k2"]
    w.add("k3", p)
    w.finish(["k1", "k2", "k3"])
    assert list(load_sidecar(path)) == ["k1", "k2", "k3"]
    w = SidecarWriter(str(tmp_path / "t.negparse.jsonl.gz"), header("t.tar", max_caption_chars=10))
    w.add("k1", p)
    w.close()
    w = SidecarWriter(str(tmp_path / "t.negparse.jsonl.gz"), header("t.tar", max_caption_chars=20))
    assert w.done == {}  # other settings: the shard starts over
    w.close()


# --- the command -----------------------------------------------------------------------------------------------

def test_precompute_writes_sidecars_that_give_the_same_negatives(tmp_path):
    shards = make_shards(tmp_path, num_shards=2, per_shard=12)
    assert precompute.main(["--shards", str(tmp_path / "{00000..00001}.tar"), "--batch-size", "5"]) == 0
    g = build(NegativesConfig(style="both", max_per_caption=2))
    fresh = build(NegativesConfig(style="both", max_per_caption=2))
    for n, shard in enumerate(shards):
        cached = load_sidecar(sidecar_path(shard))
        assert cached is not None
        expected_keys = [f"{n:05d}{i:04d}" for i in range(12)]
        assert list(cached) == expected_keys  # every sample, in shard order
        for i, key in enumerate(expected_keys):
            cap = caption_of(CAPTIONS[(n * 12 + i) % len(CAPTIONS)], f"alt text {n * 12 + i}")
            parse = cached[key]
            assert parse.matches(cap)
            for epoch in (0, 5):
                assert g.generate(cap, key, epoch, parse=parse) == fresh.generate(cap, key, epoch)
    assert g.stats["num_cached_parse"] == 48 and g.stats["num_parsed"] == 0  # no spaCy with a sidecar
    assert fresh.stats["num_parsed"] == 48


def test_precompute_reads_captions_like_the_pipeline(tmp_path, capsys):
    path = str(tmp_path / "00000.tar")
    write_shard(path, [
        {"key": "a", "json": {"top_caption": "  A dog on a sofa.  "}, "txt": "alt"},
        {"key": "b", "json": {"top_caption": ""}, "txt": "A cat on a mat."},  # falls back to the alt-text
        {"key": "c", "json": b"{not json", "txt": "A bird in a tree."},  # a broken json is counted
        {"key": "d", "json": {"other": 1}},  # no caption at all: counted, left out
        {"key": "dir/e", "json": {"top_caption": "A horse in a field."}},
    ])
    assert precompute.main(["--shards", path]) == 0
    cached = load_sidecar(sidecar_path(path))
    assert sorted(cached) == ["a", "b", "c", "dir/e"]
    assert cached["a"].matches("A dog on a sofa.") and cached["b"].matches("A cat on a mat.")
    err = capsys.readouterr().err
    assert "bad_json 1" in err and "no_caption 1" in err and "samples 4" in err
    assert precompute.main(["--shards", path, "--caption-key", "txt"]) == 0  # finished: skipped, not redone
    assert "shards_skipped 1" in capsys.readouterr().err
    assert precompute.main(["--shards", path, "--caption-key", "txt", "--force", "--out",
                            str(tmp_path / "side")]) == 0
    alt = load_sidecar(sidecar_path(path, str(tmp_path / "side")))
    assert alt["a"].matches("alt") and "d" not in alt


def test_precompute_takes_settings_from_a_run_config(tmp_path):
    path = str(tmp_path / "00000.tar")
    write_shard(path, [{"key": "a", "json": {"top_caption": "A dog on a sofa."}, "txt": "A cat on a mat."}])
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  caption_key: txt\nnegatives:\n  sidecar_dir: {tmp_path / 'side'}\n"
                      "  max_caption_chars: 64\n")
    assert precompute.main(["--shards", path, "--config", str(config)]) == 0
    cached = load_sidecar(sidecar_path(path, str(tmp_path / "side")))
    assert cached["a"].matches("A cat on a mat.")
    assert precompute.main(["--shards", path, "--config", str(tmp_path / "missing.yaml")]) == 2


def test_precompute_resumes_an_interrupted_shard(tmp_path):
    path = make_shards(tmp_path, num_shards=1, per_shard=10)[0]
    side = sidecar_path(path)
    settings = {"caption_key": "json.top_caption", "fallback_caption_key": "txt", "max_caption_chars": 512,
                "spacy_model": "en_core_web_sm"}
    w = SidecarWriter(side, header(path, **settings))
    marker = Parse("no_noun", 12345)  # not what a parse would give: proves the entry was kept, not redone
    w.add("000000000", marker)
    w.flush()
    w.close()
    with open(side + ".partial", "a") as f:
        f.write('{"k": "0000000')
    assert precompute.main(["--shards", path]) == 0
    cached = load_sidecar(side)
    assert len(cached) == 10 and cached["000000000"] == marker and cached["000000001"].status == "ok"
    assert not os.path.exists(side + ".partial")


def test_precompute_user_errors_are_one_line(tmp_path, capsys):
    assert precompute.main(["--shards", str(tmp_path / "{0..3}.tar")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "do not exist" in err
    assert precompute.main(["--shards", str(tmp_path / "*.tar")]) == 2
    assert "matched no shard files" in capsys.readouterr().err
    (tmp_path / "0.tar").write_bytes(b"")
    assert precompute.main(["--shards", str(tmp_path / "0.tar"), "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


def test_corrupt_shard_keeps_what_was_read(tmp_path, capsys):
    path = make_shards(tmp_path, num_shards=1, per_shard=6)[0]
    data = open(path, "rb").read()
    end = data.index(b"\xff\xd9", data.index(b"000000004.jpg")) # inside the fifth sample's image
    open(path, "wb").write(data[:end])  # a shard cut short on disk
    assert precompute.main(["--shards", path]) == 0
    cached = load_sidecar(sidecar_path(path))
    assert 0 < len(cached) < 6 and "corrupt_shards 1" in capsys.readouterr().err


# --- several processes -----------------------------------------------------------------------------------------

@pytest.mark.multiproc
def test_workers_produce_the_same_sidecars(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    shards = make_shards(tmp_path, num_shards=2, per_shard=6)
    pattern = str(tmp_path / "*.tar")
    assert precompute.main(["--shards", pattern, "--out", str(one), "--workers", "1"]) == 0
    assert precompute.main(["--shards", pattern, "--out", str(two), "--workers", "2"]) == 0
    for shard in shards:
        assert load_sidecar(sidecar_path(shard, str(one))) == load_sidecar(sidecar_path(shard, str(two)))


class _Captions(torch.utils.data.IterableDataset):
    """An iterable dataset over (key, caption, parse) that shards itself over DataLoader workers."""

    def __init__(self, items, gen):
        super().__init__()
        self.items, self.gen = items, gen

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, num = (info.id, info.num_workers) if info else (0, 1)
        for i, (key, caption, parse) in enumerate(self.items):
            if i % num == wid:
                for epoch in (0, 1):
                    negs = self.gen.generate(caption, key, epoch, parse=parse)
                    yield key, epoch, [[n.text, n.kind, n.old, n.new] for n in negs]


@pytest.mark.multiproc
@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on a 2-core machine, on purpose
def test_same_negatives_for_one_and_three_workers():
    gen = build(NegativesConfig(style="both", max_per_caption=2, seed=3))
    keys = [f"s{i:03d}" for i in range(len(CAPTIONS) * 2)]
    caps = CAPTIONS * 2
    items = list(zip(keys, caps, gen.parse_many(caps)))
    here = {(k, e): negs for k, e, negs in _Captions(items, gen)}
    results = []
    for workers in (1, 3):
        loader = torch.utils.data.DataLoader(_Captions(items, gen), batch_size=None, num_workers=workers,
                                             multiprocessing_context="fork")
        results.append({(k, e): negs for k, e, negs in loader})
    assert results[0] == results[1] == here
    assert sum(1 for v in here.values() if v) >= len(here) - 8  # all but the empty and Chinese captions


_CHILD = """
import json, sys
from clove_dist.config import NegativesConfig
from clove_dist.negatives import Parse, build
items = json.load(sys.stdin)
gen = build(NegativesConfig(style="both", max_per_caption=2, seed=3))
out = {k: [[n.text, n.kind, n.old, n.new] for n in gen.generate(c, k, 7, parse=Parse.from_json(p))]
       for k, c, p in items}
json.dump(out, sys.stdout)
"""


@pytest.mark.multiproc
def test_same_negatives_in_a_fresh_interpreter():
    """Another process with another hash seed (a restart, another rank) draws exactly the same negatives."""
    gen = build(NegativesConfig(style="both", max_per_caption=2, seed=3))
    keys = [f"r{i:03d}" for i in range(len(CAPTIONS))]
    parses = gen.parse_many(CAPTIONS)
    here = {k: [[n.text, n.kind, n.old, n.new] for n in gen.generate(c, k, 7, parse=p)]
            for k, c, p in zip(keys, CAPTIONS, parses)}
    env = {**os.environ, "PYTHONHASHSEED": "4242", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")])}
    payload = json.dumps([[k, c, p.to_json()] for k, c, p in zip(keys, CAPTIONS, parses)])
    run = subprocess.run([sys.executable, "-c", _CHILD], input=payload, capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout) == here
