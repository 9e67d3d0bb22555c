"""The webdataset pipeline on real tar shards: batch layout, caption selection, negatives from sidecars or spaCy,
corrupt shards and samples counted and skipped, and user mistakes as one line."""
from __future__ import annotations

import io
import json
import tarfile

import open_clip
import pytest
import torch
from PIL import Image

from clove_dist.config import DataConfig, NegativesConfig
import clove_dist.model  # noqa: F401  (registers the clove-micro architecture with open_clip)
from clove_dist.data.pipeline import build_dataset
from clove_dist.shards import ShardError, caption_of, expand_shards


def _jpeg(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _sample(key, caption, alt="alt text"):
    return key, {"jpg": _jpeg(), "txt": alt.encode(), "json": json.dumps({"top_caption": caption}).encode()}


@pytest.fixture(scope="module")
def tools():
    model, _, preprocess = open_clip.create_model_and_transforms("clove-micro")
    return preprocess, open_clip.get_tokenizer("clove-micro")


def _batches(shards, tools, n, **data_kw):
    preprocess, tokenizer = tools
    kw = dict(train_shards=shards, batch_size=4, num_workers=0, shuffle_buffer=0, resampled=False)
    kw.update(data_kw)
    neg = NegativesConfig(style=kw.pop("style", "none"))
    ds = build_dataset(DataConfig(**kw), neg, preprocess, tokenizer, seed=0)
    out = []
    for batch in ds:
        out.append(batch)
        if len(out) == n:
            break
    return out


def test_batch_layout_and_caption_choice(tmp_path, tools):
    samples = [_sample(f"{i:09d}", f"a red circle number {i}") for i in range(8)]
    samples[3] = ("000000003", {"jpg": _jpeg(), "txt": b"only alt text", "json": b"{}"})
    _write_shard(tmp_path / "0.tar", samples)
    (batch,) = _batches(str(tmp_path / "0.tar"), tools, 1)
    assert batch["images"].shape == (4, 3, 32, 32) and batch["texts"].shape == (4, 16)
    assert batch["negatives"].shape == (0, 16) and batch["negative_valid"].shape == (0,)
    tokenizer = tools[1]
    assert torch.equal(batch["texts"][0], tokenizer(["a red circle number 0"])[0])
    assert torch.equal(batch["texts"][3], tokenizer(["only alt text"])[0])  # fallback caption key: txt


def test_corrupt_samples_and_shards_are_counted_and_skipped(tmp_path, tools):
    good = [_sample(f"{i:09d}", f"a blue square {i}") for i in range(6)]
    bad_image = ("000000100", {"jpg": b"not a jpeg", "json": json.dumps({"top_caption": "x"}).encode()})
    no_caption = ("000000101", {"jpg": _jpeg(), "json": b"{}"})
    no_image = ("000000102", {"txt": b"caption without image"})
    bad_json = ("000000103", {"jpg": _jpeg(), "json": b"{truncated"})
    # shard 0 is truncated mid-file (a corrupt shard); shard 1 holds good and bad samples. Shards are read in
    # order here (one pass, no shuffle), so the skips are reported with the batches that follow them.
    truncated = tmp_path / "0.tar"
    _write_shard(truncated, [_sample(f"{i:09d}", f"a green star {i}") for i in range(200, 203)])
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2 + 100])
    _write_shard(tmp_path / "1.tar", good[:3] + [bad_image, no_caption, no_image, bad_json] + good[3:] + good[:2])
    batches = _batches(f"{tmp_path}/{{0..1}}.tar", tools, 10, fallback_caption_key="")
    stats: dict[str, int] = {}
    for b in batches:
        for k, v in b["stats"].items():
            stats[k] = stats.get(k, 0) + v
    assert stats.get("bad_image") == 1 and stats.get("no_caption") == 1 and stats.get("no_image") == 1
    assert stats.get("bad_json") == 1
    assert stats.get("corrupt_shard", 0) >= 1
    assert sum(b["num_samples"] for b in batches) == 8  # two whole batches of 4; a partial batch is never formed


def test_negatives_in_batches_are_fixed_size_and_masked(tmp_path, tools):
    caps = ["a small red circle to the left of a large blue square", "a green triangle above a yellow star",
            "two dogs running on the beach", "?!"]
    _write_shard(tmp_path / "0.tar", [_sample(f"{i:09d}", c) for i, c in enumerate(caps)])
    (batch,) = _batches(str(tmp_path / "0.tar"), tools, 1, style="replace")
    assert batch["negatives"].shape == (4, 16)
    valid = batch["negative_valid"]
    assert 1 <= int(valid.sum()) <= 3  # "?!" has no noun: no negative, its row stays masked
    assert (batch["negatives"][~valid] == 0).all()
    assert batch["stats"].get("negatives_num_captions") == 4


def test_expand_shards_errors(tmp_path):
    with pytest.raises(ShardError, match="is empty"):
        expand_shards("")
    with pytest.raises(ShardError, match="4 of 4 shard files do not exist"):
        expand_shards(f"{tmp_path}/x-{{0..3}}.tar")
    with pytest.raises(ShardError, match="matched no shard files"):
        expand_shards(f"{tmp_path}/x-*.tar")
    (tmp_path / "a-0.tar").write_bytes(b"")
    with pytest.raises(ShardError, match="1 of 2 shard files do not exist"):
        expand_shards(f"{tmp_path}/a-{{0..1}}.tar")
    assert expand_shards(f"{tmp_path}/a-0.tar::{tmp_path}/a-*.tar") == [f"{tmp_path}/a-0.tar"] * 2


def test_caption_of():
    s = {"json": b'{"top_caption": "  a cat  "}', "txt": b"alt"}
    assert caption_of(s, "json.top_caption") == "a cat"
    assert caption_of(s, "json.missing") == "" and caption_of(s, "txt") == "alt"
    with pytest.raises(ValueError):
        caption_of({"json": b"{not json"}, "json.top_caption")  # the pipeline counts it as bad_json


def test_negatives_stay_inside_the_model_text_context(tmp_path, tools):
    """negatives.context_length is 77 by default; clove-micro reads 16 tokens. An edit past the 16th would give a
    negative its model cannot tell from the caption, so the loader caps the window at the tokenizer's."""
    late = "so this is it and this is it and this is it and so it is, a red dog sleeping on a bed"
    early = "a red dog sleeping on a bed"
    _write_shard(tmp_path / "0.tar", [_sample(f"{i:09d}", c) for i, c in enumerate([late, early, late, early])])
    assert tools[1].context_length == 16 and NegativesConfig().context_length == 77
    (batch,) = _batches(str(tmp_path / "0.tar"), tools, 1, style="both")
    assert batch["negative_owner"][batch["negative_valid"]].tolist() == [1, 3]  # only the short captions
