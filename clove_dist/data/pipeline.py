"""The training data pipeline: webdataset tar shards -> batches of images, captions and hard negatives.

    loader = build_loader(cfg.data, cfg.negatives, preprocess_train, tokenizer, seed=cfg.run.seed)
    for batch in loader:   # images [B,3,H,W], texts [B,L], negatives [N,L], negative_valid [N], negative_owner [N],
        ...                #   stats {name: count}
        ...

Shards follow img2dataset's LAION-COCO layout: `{key}.jpg`, `{key}.txt` (alt-text), `{key}.json` (with
`top_caption`). Shards are drawn with replacement (ResampledShards, deterministic per rank, worker and seed), or
each shard once per epoch split by node and worker. A corrupt shard or sample is skipped and counted, never fatal:
the counts ride along with each batch (`batch["stats"]`) so the trainer can sum them into the run's metrics.

Negatives come from `clove_dist.negatives` and depend only on (seed, sample key, epoch). The "epoch" of a sample
is how many times this worker has drawn its shard before (resampled mode) or the loader epoch (one pass mode), so a
re-drawn sample gets fresh negatives. When a sidecar of precomputed parses sits next to a shard, it is used and no
spaCy runs at training time (negatives.sidecar_dir when they were written elsewhere).
"""
from __future__ import annotations

import dataclasses
import io
import os
from collections import Counter, OrderedDict
from typing import Any, Callable, Iterator

import torch
import webdataset as wds
from PIL import Image

from ..config import DataConfig, NegativesConfig
from ..log import log
from ..shards import ShardError, caption_of, expand_shards, image_of
MAX_WARNINGS = 5  # per worker; every skip is counted either way
# The shuffle buffer interleaves samples of several shards: keep the sidecars of the most recent ones loaded.
SIDECARS_KEPT = 16
MAX_SKIPS_IN_A_ROW = 10_000  # a stream of nothing but skips is a misconfiguration, not bad luck: stop with one line
NEGATIVES_CHUNK = 64  # samples whose captions are parsed in one spaCy call when no sidecar has them (3-4x faster)


class SkipCounter:
    """Exception handler for webdataset stages: count the failure by kind, warn a few times, continue."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._warned = 0
        self.in_a_row = 0  # reset by every sample that is kept

    def skip(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        self.in_a_row += 1
        if self.in_a_row >= MAX_SKIPS_IN_A_ROW:
            raise ShardError(f"{self.in_a_row} samples in a row were skipped (last: {kind}, {detail}); check "
                             f"data.caption_key / data.fallback_caption_key and the shards")
        self._warn(kind, detail)

    def _warn(self, kind: str, detail: str) -> None:
        if self._warned < MAX_WARNINGS:
            self._warned += 1
            log(f"WARNING: skipped {kind}: {detail}", all_ranks=True)

    def handler(self, exn: Exception) -> bool:
        self.counts["corrupt_shard"] += 1  # a whole shard: not counted towards MAX_SKIPS_IN_A_ROW
        self._warn("corrupt_shard", f"{type(exn).__name__}: {exn}")
        return True

    def take(self) -> dict[str, int]:
        out = dict(self.counts)
        self.counts.clear()
        return out


class SampleBuilder:
    """Turns a raw tar sample into (image tensor, caption tokens, negative tokens); picklable for workers."""

    def __init__(self, data_cfg: DataConfig, neg_cfg: NegativesConfig, preprocess: Callable, tokenizer: Callable,
                 epoch: int = 0) -> None:
        self.data_cfg = data_cfg
        window = getattr(tokenizer, "context_length", 0)  # open_clip's tokenizers carry the model's text context
        if window and not 0 < neg_cfg.context_length <= window:
            neg_cfg = dataclasses.replace(neg_cfg, context_length=window)  # no edit past what the model reads
        self.neg_cfg = neg_cfg
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.epoch = epoch
        self.resampled = data_cfg.resampled
        self.skips = SkipCounter()
        self._generator = None
        self._sidecars: OrderedDict[str, dict[str, Any] | None] = OrderedDict()  # by shard URL, least recent first
        self._draws: Counter[str] = Counter()
        self._last_neg_stats: dict[str, int] = {}

    @property
    def generator(self):
        if self._generator is None and self.neg_cfg.style != "none":
            from .. import negatives
            self._generator = negatives.build(self.neg_cfg)
        return self._generator

    def _parse_for(self, url: str, key: str) -> Any:
        if not self.neg_cfg.use_sidecar:
            return None
        if url not in self._sidecars:
            from .. import negatives
            path = negatives.sidecar_path(url, self.neg_cfg.sidecar_dir)
            self._sidecars[url] = negatives.load_sidecar(path) if os.path.exists(path) else None
            if len(self._sidecars) > SIDECARS_KEPT:
                self._sidecars.popitem(last=False)
        self._sidecars.move_to_end(url)
        sidecar = self._sidecars[url]
        return sidecar.get(key) if sidecar else None

    def stamp_epochs(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Before shuffling: mark each sample with its negatives epoch (see the module docstring)."""
        current = None
        for sample in src:
            url = sample.get("__url__", "")
            if url != current:  # a new shard, or a new draw of the same one, starts
                current = url
                self._draws[url] += 1
            # offset by the loader's epoch (the step a resumed run starts at): redraws after a resume are fresh too
            sample["__epoch__"] = self.epoch + (self._draws[url] - 1 if self.resampled else 0)
            yield sample

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any] | None:
        key = sample.get("__key__", "?")
        url = sample.get("__url__", "")
        image_bytes = image_of(sample)
        if image_bytes is None:
            self.skips.skip("no_image", f"{url}:{key}")
            return None
        try:
            caption = caption_of(sample, self.data_cfg.caption_key)
            if not caption and self.data_cfg.fallback_caption_key:
                caption = caption_of(sample, self.data_cfg.fallback_caption_key)
        except ValueError as e:  # a JSON part that is not JSON
            self.skips.skip("bad_json", f"{url}:{key}: {e}")
            return None
        if not caption:
            self.skips.skip("no_caption", f"{url}:{key}")
            return None
        try:
            with Image.open(io.BytesIO(image_bytes)) as img:
                image = self.preprocess(img.convert("RGB"))
        except Exception as e:  # any undecodable image is a skipped sample
            self.skips.skip("bad_image", f"{url}:{key}: {type(e).__name__}")
            return None
        self.skips.in_a_row = 0
        return {"image": image, "caption": caption, "key": key, "epoch": sample.get("__epoch__", self.epoch),
                "parse": self._parse_for(url, key) if self.generator is not None else None}

    def add_negatives(self, built: list[dict[str, Any]]) -> None:
        """Negative texts for a chunk of samples at once: captions without a cached parse share one spaCy call."""
        gen = self.generator
        if gen is None:
            for b in built:
                b["negatives"] = []
            return
        results = gen.generate_many([b["caption"] for b in built], [b["key"] for b in built],
                                    [b["epoch"] for b in built], parses=[b.pop("parse") for b in built])
        for b, negs in zip(built, results):
            b["negatives"] = [n.text for n in negs][: self.neg_cfg.max_per_caption]

    def map_samples(self, src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        chunk: list[dict[str, Any]] = []
        for sample in src:
            out = self(sample)
            if out is not None:
                chunk.append(out)
            if len(chunk) == NEGATIVES_CHUNK:
                self.add_negatives(chunk)
                yield from chunk
                chunk = []
        if chunk:
            self.add_negatives(chunk)
            yield from chunk

    def negative_stats(self) -> dict[str, int]:
        """The generator's counters since the last call (its own counters are cumulative)."""
        now = {f"negatives_{k}": int(v) for k, v in dict(getattr(self._generator, "stats", {}) or {}).items()}
        delta = {k: v - self._last_neg_stats.get(k, 0) for k, v in now.items()}
        self._last_neg_stats = now
        return {k: v for k, v in delta.items() if v}


class Collate:
    """Stack a list of built samples into a batch with a fixed number of (possibly invalid) negative rows."""

    def __init__(self, builder: SampleBuilder, tokenizer: Callable, num_negatives: int) -> None:
        self.builder = builder
        self.tokenizer = tokenizer
        self.num_negatives = num_negatives

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        images = torch.stack([s["image"] for s in samples])  # (B, 3, H, W)
        texts = self.tokenizer([s["caption"] for s in samples])  # (B, L)
        pairs = [(i, t) for i, s in enumerate(samples) for t in s["negatives"]][: self.num_negatives]
        context = texts.shape[1]
        negatives = torch.zeros(self.num_negatives, context, dtype=texts.dtype)  # (N, L), padded rows invalid
        valid = torch.zeros(self.num_negatives, dtype=torch.bool)
        owner = torch.full((self.num_negatives,), -1, dtype=torch.long)  # (N,) the sample each negative is of
        if pairs:
            negatives[: len(pairs)] = self.tokenizer([t for _, t in pairs])
            valid[: len(pairs)] = True
            owner[: len(pairs)] = torch.tensor([i for i, _ in pairs])
        stats = self.builder.skips.take()
        stats.update(self.builder.negative_stats())
        return {"images": images, "texts": texts, "negatives": negatives, "negative_valid": valid,
                "negative_owner": owner,
                "stats": stats, "num_samples": len(samples)}


def num_negative_rows(data_cfg: DataConfig, neg_cfg: NegativesConfig) -> int:
    if neg_cfg.style == "none":
        return 0
    return data_cfg.max_negatives_per_batch or data_cfg.batch_size * neg_cfg.max_per_caption


def stream_seed(run_seed: int, resampled: bool, step: int, epoch: int) -> tuple[int, int]:
    """(shard seed, negatives epoch) of a loader built at `step` (resampled) or for one-pass `epoch`.

    Resampled: each rank and worker draws its own shards (webdataset seeds them by rank and worker); seeding by the
    step the run (re)starts at gives fresh draws after a resume. One pass: the seed depends on the epoch alone, so
    every rank shuffles the same permutation of the shards and takes its own share of it (each shard read once per
    epoch by exactly one worker of one rank), whatever step each rank reached the epoch at."""
    base = run_seed * 1_000_003
    return (base + step, step) if resampled else (base + epoch, epoch)


def shard_stages(data_cfg: DataConfig, urls: list[str], seed: int) -> list[Any]:
    """The pipeline's first stages: which shard URLs this rank and worker read, in which order."""
    if data_cfg.resampled:
        return [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    return [wds.SimpleShardList(urls, seed=seed), wds.split_by_node, wds.split_by_worker]


def build_dataset(data_cfg: DataConfig, neg_cfg: NegativesConfig, preprocess: Callable, tokenizer: Callable, *,
                  seed: int = 0, epoch: int = 0) -> wds.DataPipeline:
    """The webdataset pipeline, yielding finished batches (it batches inside the workers)."""
    urls = expand_shards(data_cfg.train_shards)
    builder = SampleBuilder(data_cfg, neg_cfg, preprocess, tokenizer, epoch=epoch)
    stages = shard_stages(data_cfg, urls, seed) + [
        wds.tarfile_to_samples(handler=builder.skips.handler),
        builder.stamp_epochs,
        wds.shuffle(data_cfg.shuffle_buffer, initial=min(data_cfg.shuffle_buffer, 1000), seed=seed + epoch),
        builder.map_samples,
        wds.batched(data_cfg.batch_size, collation_fn=Collate(builder, tokenizer,
                                                               num_negative_rows(data_cfg, neg_cfg)), partial=False),
    ]
    return wds.DataPipeline(*stages)


def build_loader(data_cfg: DataConfig, neg_cfg: NegativesConfig, preprocess: Callable, tokenizer: Callable, *,
                 seed: int = 0, epoch: int = 0) -> torch.utils.data.DataLoader:
    dataset = build_dataset(data_cfg, neg_cfg, preprocess, tokenizer, seed=seed, epoch=epoch)
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=data_cfg.num_workers,
                                       persistent_workers=False,
                                       prefetch_factor=2 if data_cfg.num_workers > 0 else None)
