"""Sidecar files: the cached parse of every caption of one shard, keyed by sample key.

    path = sidecar_path("/data/00042.tar")          # /data/00042.negparse.jsonl.gz
    parses = load_sidecar(path)                      # {key: Parse}, or None when absent, incomplete or corrupt

Format: gzip JSON lines. A header line ({"format": "clove-dist-negparse", "version": 1, ...}), one line per sample
({"k": key, "p": Parse.to_json()}), and an end line ({"end": number of samples}). A sidecar is written complete
under a temporary name and renamed into place, so a reader never sees half of one; a file without its end line
(copied while incomplete, cut short on disk) reads as absent, and the data pipeline parses on the fly instead.

Work in progress on a shard lives in `<sidecar>.partial`: plain JSON lines appended and flushed batch by batch, so
an interrupted `clove-dist negatives` resumes after the last complete line.
"""
from __future__ import annotations

import gzip
import json
import os
import zlib
from typing import Any, TextIO

from ..log import warn_once
from .parse import Parse

FORMAT = "clove-dist-negparse"
VERSION = 2  # 2: relation objects, verb transitivity and swap owners in the parse
SUFFIX = ".negparse.jsonl.gz"


def sidecar_path(shard_path: str, out_dir: str = "") -> str:
    """Where the sidecar of `shard_path` lives: next to it, or in `out_dir` (negatives.sidecar_dir) when given."""
    base = os.path.basename(shard_path)
    stem = base.split(".tar")[0] if ".tar" in base else os.path.splitext(base)[0]
    return os.path.join(out_dir or os.path.dirname(shard_path), stem + SUFFIX)


def header(shard: str, **meta: Any) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "shard": os.path.basename(shard), **meta}


def _check_header(obj: Any, path: str) -> bool:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        warn_once(f"{path} is not a negatives sidecar; ignoring it")
        return False
    if obj.get("version") != VERSION:
        warn_once(f"{path} is sidecar version {obj.get('version')!r}, this reader knows {VERSION}; ignoring it")
        return False
    return True


def load_sidecar(path: str) -> dict[str, Parse] | None:
    """{sample key: Parse} from a complete sidecar; None (with one warning) when absent, incomplete or corrupt."""
    if not os.path.isfile(path):
        return None
    parses: dict[str, Parse] = {}
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            first = f.readline()
            if not first or not _check_header(json.loads(first), path):
                return None
            for line in f:
                obj = json.loads(line)
                if "end" in obj:
                    if obj["end"] != len(parses):
                        raise ValueError(f"end line counts {obj['end']} samples, found {len(parses)}")
                    return parses
                parses[obj["k"]] = Parse.from_json(obj["p"])
    except (OSError, EOFError, ValueError, KeyError, TypeError, zlib.error) as e:
        warn_once(f"negatives sidecar {path} is unreadable ({type(e).__name__}: {e}); parsing on the fly")
        return None
    warn_once(f"negatives sidecar {path} has no end line (incomplete); parsing on the fly")
    return None


def read_partial(path: str) -> tuple[dict[str, Any] | None, dict[str, Parse]]:
    """(header, entries) of an interrupted run's `.partial` file; a torn last line is cut off so appending resumes."""
    head: dict[str, Any] | None = None
    done: dict[str, Parse] = {}
    if not os.path.isfile(path):
        return None, done
    good = 0
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for raw in lines[:-1]:  # the piece after the last newline is, at best, an unfinished line
        try:
            obj = json.loads(raw)
            if head is None:
                if not _check_header(obj, path):
                    break
                head = obj
            else:
                done[obj["k"]] = Parse.from_json(obj["p"])
        except (KeyError, TypeError, ValueError):
            break
        good += len(raw) + 1
    if head is None:
        os.remove(path)
        return None, {}
    with open(path, "r+b") as f:
        f.truncate(good)
    return head, done


class SidecarWriter:
    """Appends entries to `<path>.partial`; `finish()` writes the complete sidecar atomically and removes it."""

    def __init__(self, path: str, head: dict[str, Any]) -> None:
        self.path = path
        self.partial = path + ".partial"
        self.head = head
        old_head, self.done = read_partial(self.partial)
        if old_head is not None and old_head != json.loads(json.dumps(head)):
            os.remove(self.partial)  # made with other settings: start the shard over
            old_head, self.done = None, {}
        self._fp: TextIO = open(self.partial, "a", encoding="utf-8")
        if old_head is None:
            self._fp.write(json.dumps(head) + "\n")

    def add(self, key: str, parse: Parse) -> None:
        self.done[key] = parse
        self._fp.write(json.dumps({"k": key, "p": parse.to_json()}, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        self._fp.flush()
        os.fsync(self._fp.fileno())

    def close(self) -> None:
        if not self._fp.closed:
            self._fp.close()

    def finish(self, keys: list[str]) -> None:
        """Write the sidecar with `keys` in shard order (every key must have been added or resumed)."""
        self.close()
        keys = list(dict.fromkeys(keys))
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=6) as f:
            f.write(json.dumps(self.head) + "\n")
            for key in keys:
                f.write(json.dumps({"k": key, "p": self.done[key].to_json()}, separators=(",", ":")) + "\n")
            f.write(json.dumps({"end": len(keys)}) + "\n")
        os.replace(tmp, self.path)
        os.remove(self.partial)
