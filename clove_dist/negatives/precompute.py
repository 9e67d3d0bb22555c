"""`clove-dist negatives`: parse every caption of a set of shards once, and write a sidecar next to each shard.

    clove-dist negatives --shards '/data/{00000..00999}.tar' --workers 8
    clove-dist negatives --shards '/data/*.tar' --out /scratch/negparse --config configs/clove_vit_b32.yaml
    python -m clove_dist.negatives.precompute --shards ...          # the same, without the console script

The parse (spaCy, about 1-3 ms a caption) is the expensive part of a negative and does not change between epochs;
with sidecars the training data pipeline runs no spaCy and still draws fresh negatives each epoch. Shards are
webdataset tars in img2dataset's LAION-COCO layout ({key}.jpg, {key}.txt, {key}.json with `top_caption`); the
caption is read as the pipeline reads it (`--caption-key`, then `--fallback-caption-key`, stripped).

While parsing, the lemmas of every caption are counted: `<shard>.negvocab.json` beside each sidecar, summed into
`negatives.vocab.json` in each sidecar directory at the end (vocabulary.py). With it, REPLACE candidates must occur
in the corpus at least `negatives.min_corpus_count` times and are drawn in proportion to their count.

Workers take whole shards. Finished shards (a complete sidecar exists) are skipped; an interrupted shard resumes
after the last flushed batch (see sidecar.py). `--out DIR` puts the sidecars in DIR, which training then needs as
`negatives.sidecar_dir`. Samples without a caption are counted and left out, as the pipeline skips them.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing
import os
import re
import sys
import tarfile
from collections import Counter
from typing import Any, Iterator

from ..config import ConfigError, NegativesConfig, load_config
from ..errors import entry_point
from ..log import log
from ..shards import caption_of, expand_shards
from .parse import SceneParser
from .sidecar import SidecarWriter, header, load_sidecar, sidecar_path
from .vocabulary import count_lemmas, is_current, merge_directory, shard_vocab_path, write_shard_vocabulary

_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's split of a member name into key and extension
_PARSERS: dict[tuple[str, int, int], SceneParser] = {}


def iter_samples(path: str, wanted: set[str], counts: Counter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample of a tar, reading only the wanted extensions; stops at corruption."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                m = _MEMBER.match(member.name)
                if not member.isfile() or m is None or os.path.basename(member.name).startswith("__"):
                    continue
                k, ext = m.group(1), m.group(2).lower()
                if k != key:
                    if key is not None:
                        yield key, parts
                    key, parts = k, {}
                if ext in wanted:
                    f = tar.extractfile(member)
                    parts[ext] = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError, OSError) as e:
        counts["num_corrupt_shards"] += 1
        log(f"WARNING: {path}: {type(e).__name__}: {e}; keeping the samples read before it", all_ranks=True)
    if key is not None:
        yield key, parts


def _parser(settings: dict[str, Any]) -> SceneParser:
    ident = (settings["spacy_model"], settings["max_caption_chars"], settings["batch_size"])
    if ident not in _PARSERS:
        _PARSERS[ident] = SceneParser(*ident)
    return _PARSERS[ident]


def process_shard(shard: str, out_path: str, settings: dict[str, Any]) -> dict[str, int]:
    """Parse one shard into its sidecar (resuming a partial one); returns counts."""
    counts: Counter = Counter()
    parser = _parser(settings)
    head = header(shard, caption_key=settings["caption_key"], fallback_caption_key=settings["fallback_caption_key"],
                  max_caption_chars=settings["max_caption_chars"], spacy_model=settings["spacy_model"])
    writer = SidecarWriter(out_path, head)
    counts["num_resumed"] += len(writer.done)
    wanted = {"json" if k.startswith("json.") else k
              for k in (settings["caption_key"], settings["fallback_caption_key"]) if k}
    keys: list[str] = []
    seen: set[str] = set()
    batch: list[tuple[str, str]] = []

    def flush() -> None:
        for (k, _), parse in zip(batch, parser.parse_many([c for _, c in batch])):
            writer.add(k, parse)
            counts[f"num_{parse.status}"] += 1
        writer.flush()
        batch.clear()

    try:
        for key, parts in iter_samples(shard, wanted, counts):
            try:
                caption = caption_of(parts, settings["caption_key"])
            except ValueError:
                counts["num_bad_json"] += 1
                caption = ""
            if not caption and settings["fallback_caption_key"]:
                try:
                    caption = caption_of(parts, settings["fallback_caption_key"])
                except ValueError:
                    caption = ""
            if not caption:
                counts["num_no_caption"] += 1
                continue
            if key in seen:
                counts["num_duplicate_keys"] += 1  # the first sample with this key keeps the sidecar entry
                continue
            seen.add(key)
            keys.append(key)
            counts["num_samples"] += 1
            if key not in writer.done:
                batch.append((key, caption))
                if len(batch) >= settings["batch_size"]:
                    flush()
        if batch:
            flush()
        writer.finish(keys)
        write_shard_vocabulary(out_path, count_lemmas(writer.done[k] for k in dict.fromkeys(keys)))
    finally:
        writer.close()
    counts["num_shards_done"] += 1
    return dict(counts)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    neg, caption_key, fallback = NegativesConfig(), "json.top_caption", "txt"
    if args.config:
        cfg = load_config(args.config)
        neg, caption_key, fallback = cfg.negatives, cfg.data.caption_key, cfg.data.fallback_caption_key
    args.out = args.out or neg.sidecar_dir
    settings = {
        "caption_key": args.caption_key if args.caption_key is not None else caption_key,
        "fallback_caption_key": args.fallback_caption_key if args.fallback_caption_key is not None else fallback,
        "max_caption_chars": args.max_caption_chars if args.max_caption_chars is not None else neg.max_caption_chars,
        "spacy_model": args.spacy_model or neg.spacy_model,
        "batch_size": args.batch_size,
    }
    if not settings["caption_key"]:
        raise ConfigError("--caption-key: must not be empty (e.g. json.top_caption or txt)")
    if settings["max_caption_chars"] < 0:
        raise ConfigError(f"--max-caption-chars: {settings['max_caption_chars']!r} must be >= 0")
    if args.batch_size < 1 or args.workers < 1:
        raise ConfigError(f"--batch-size {args.batch_size!r} and --workers {args.workers!r} must be >= 1")
    return settings


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clove-dist negatives", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="shard pattern(s): brace-expanded, globs, several joined by ::")
    p.add_argument("--out", default="", help="directory for the sidecars (default: negatives.sidecar_dir of "
                   "--config, else next to each shard)")
    p.add_argument("--workers", type=int, default=1, help="processes, each parsing whole shards")
    p.add_argument("--config", default="", help="take caption keys and negatives settings from this run config")
    p.add_argument("--caption-key", default=None, help="json.<field> or an extension (default json.top_caption)")
    p.add_argument("--fallback-caption-key", default=None, help="used when the caption is missing (default txt)")
    p.add_argument("--max-caption-chars", type=int, default=None, help="captions are cut here before parsing")
    p.add_argument("--spacy-model", default="", help="spaCy pipeline (default en_core_web_sm)")
    p.add_argument("--batch-size", type=int, default=256, help="captions per spaCy batch and per flush")
    p.add_argument("--force", action="store_true", help="redo shards whose sidecar is already complete")
    return p


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = _settings(args)
    shards = expand_shards(args.shards, option="--shards", unique=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    jobs, totals = [], Counter()
    for shard in shards:
        out_path = sidecar_path(shard, args.out)
        done = None if args.force else load_sidecar(out_path)
        if done is not None:
            totals["num_shards_skipped"] += 1
            if not is_current(shard_vocab_path(out_path)):  # an older version's counts: count again
                write_shard_vocabulary(out_path, count_lemmas(done.values()))
                totals["num_vocabularies_recounted"] += 1
        else:
            jobs.append((shard, out_path))
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), unit="shard", desc="negatives", file=sys.stderr, disable=not jobs)
    workers = min(args.workers, len(jobs))
    if workers <= 1:
        for shard, out_path in jobs:
            totals.update(process_shard(shard, out_path, settings))
            bar.update(1)
            bar.set_postfix(captions=totals["num_samples"])
    else:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no forked spaCy/torch state
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [pool.submit(process_shard, shard, out_path, settings) for shard, out_path in jobs]
            try:
                for fut in cf.as_completed(futures):
                    totals.update(fut.result())
                    bar.update(1)
                    bar.set_postfix(captions=totals["num_samples"])
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # finished shards stay; the rest resume next time
                raise
    bar.close()
    summary = ", ".join(f"{k[4:]} {v}" for k, v in sorted(totals.items()))
    log(f"negatives: {len(shards)} shards ({summary or 'nothing to do'})")
    for directory in sorted({os.path.dirname(sidecar_path(shard, args.out)) for shard in shards}):
        path = merge_directory(directory)
        log(f"negatives: corpus vocabulary {path} (set negatives.vocabulary to it, or keep it in "
            "negatives.sidecar_dir, where it is found by itself)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
