"""Shard patterns, and the caption field and image part of img2dataset-style tar shards, shared by the data
pipeline, the `clove-dist negatives` command (which must not import the pipeline) and patching.

    expand_shards("/data/{00000..00099}.tar::/more/*.tar", option="data.train_shards")
    caption_of({"json": b'{"top_caption": "a cat"}', "txt": b"alt"}, "json.top_caption")   # "a cat"
    image_of({"jpg": b"...", "txt": b"alt"})                                                 # b"..."
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any

import braceexpand

from .errors import UserError


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the image parts of img2dataset / webdataset samples


class ShardError(UserError):
    """The shard pattern is empty, matches nothing, or names files that are missing."""


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_shards(pattern: str, option: str = "data.train_shards", unique: bool = False) -> list[str]:
    """'::'-separated brace patterns and globs -> shard paths in order; ShardError naming `option` when the
    pattern is empty, matches nothing, or names local files that do not exist. Remote URLs are kept unchecked.
    Repeats are kept (they weight a shard) unless `unique`."""
    if not pattern.strip():
        raise ShardError(f"{option} is empty: give a shard pattern such as /data/{{00000..00099}}.tar")
    urls: list[str] = []
    for part in pattern.split("::"):
        for url in braceexpand.braceexpand(part.strip()):
            if not _is_remote(url) and any(c in url for c in "*?["):
                urls.extend(sorted(glob.glob(url)))
            else:
                urls.append(url)
    missing = [u for u in urls if not _is_remote(u) and not os.path.isfile(u)]
    if not urls:
        raise ShardError(f"{option} {pattern!r} matched no shard files")
    if missing:
        raise ShardError(f"{option}: {len(missing)} of {len(urls)} shard files do not exist (first: {missing[0]})")
    return list(dict.fromkeys(urls)) if unique else urls


def caption_of(sample: dict[str, Any], key: str) -> str:
    """Caption by key: 'json.<field>' reads a field of the JSON part, anything else a text part by extension.
    "" when absent; ValueError when the JSON part is not valid JSON (the caller counts it)."""
    if key.startswith("json."):
        raw = sample.get("json")
        if raw is None:
            return ""
        meta = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
        value = meta.get(key[5:]) if isinstance(meta, dict) else None
        return value.strip() if isinstance(value, str) else ""
    raw = sample.get(key)
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    return raw.strip() if isinstance(raw, str) else ""


def image_of(sample: dict[str, Any]) -> bytes | None:
    """The encoded image of a sample (its first part named by IMAGE_EXTS), None when it has none."""
    return next((sample[e] for e in IMAGE_EXTS if e in sample), None)
