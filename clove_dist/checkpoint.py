"""Training checkpoints that survive kill -9 at any moment, and resuming them on the same or another world size.

    ckpt = Checkpointer(run_dir / "checkpoints", keep_last=2)
    ckpt.save(engine, step, client_state)          # every rank; collective
    found = ckpt.find(cfg.checkpoint.resume)       # (directory, tag, manifest) of the newest complete one, or None

A checkpoint is DeepSpeed's directory of per-rank shards (`<dir>/step000001000/`). The order of a save:

1. every rank writes its shards (`save_checkpoint(save_latest=False)`: DeepSpeed's own `latest` is not atomic) and
   fsyncs them; barrier;
2. rank 0 writes `manifest.json` last (each file's size, the step, world size, ZeRO stage) and fsyncs it: a tag
   directory without a manifest is a partial write and is never loaded;
3. rank 0 replaces `latest` atomically (`os.replace` of an fsynced temporary file), then prunes old tags, each first
   renamed away so that a pruning cut short never leaves a half-deleted tag under a valid name.

Loading checks the manifest: a missing or shorter file is a one-line error naming the checkpoint (damaged), not a
traceback from deep inside torch.load.

Another world size: DeepSpeed's ZeRO shards are cut for the ranks that wrote them. When the manifest's world size
differs from the current one, rank 0 converts the checkpoint once into DeepSpeed's universal format
(`ds_to_universal`, written beside it as `<tag>_universal`) and the engine loads that (`checkpoint.load_universal`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import dist as cdist
from .errors import UserError
from .log import log

MANIFEST = "manifest.json"
TAG_PATTERN = re.compile(r"step\d{9}")
UNIVERSAL_SUFFIX = "_universal"


class CheckpointError(UserError):
    """A checkpoint that cannot be used: damaged, of another run, or not convertible; one line naming it."""


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (the directory entry itself is data)."""
    try:
        fsync_file(path)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _files(tag_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def read_manifest(tag_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((tag_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def verify(tag_dir: Path) -> dict[str, Any]:
    """The manifest of a complete, undamaged checkpoint; CheckpointError naming what is wrong otherwise."""
    manifest = read_manifest(tag_dir)
    if manifest is None:
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete (no {MANIFEST}: its save was interrupted)")
    for name, size in manifest.get("files", {}).items():
        f = tag_dir / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {tag_dir} is damaged: {name} is missing")
        if f.stat().st_size != size:
            raise CheckpointError(f"checkpoint {tag_dir} is damaged: {name} has {f.stat().st_size} bytes, "
                                  f"{size} were written")
    return manifest


@dataclass
class Checkpointer:
    directory: Path
    keep_last: int

    @staticmethod
    def tag(step: int) -> str:
        return f"step{step:09d}"

    def complete_tags(self) -> list[str]:
        """Tags with a manifest, oldest first."""
        if not self.directory.is_dir():
            return []
        # only real tags: not `<tag>_universal`, nor a `.deleting` / `.tmp` left by a kill
        return sorted(p.name for p in self.directory.glob("step*")
                      if TAG_PATTERN.fullmatch(p.name) and p.is_dir() and (p / MANIFEST).is_file())

    def latest(self) -> str | None:
        """The tag `latest` names, or the newest complete tag when `latest` is missing or names no directory."""
        f = self.directory / "latest"
        tag = f.read_text().strip() if f.is_file() else ""
        if tag and (self.directory / tag).is_dir():
            return tag
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> None:
        """Collective: every rank calls it at the same step."""
        tag = self.tag(step)
        tag_dir = self.directory / tag
        is_main = cdist.rank() == 0
        if is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # a save of this step that a kill cut short: never mix its files with this one
                self._discard(tag_dir)
        cdist.barrier()
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        for f in tag_dir.rglob("*"):
            if f.is_file():
                fsync_file(f)
        # every rank's shards are durable before the manifest says the checkpoint is complete; each rank lists what
        # it sees (node-local directories, attribute caches), rank 0 records the union
        files = cdist.gather_objects(_files(tag_dir))
        if is_main:
            listed = {name: size for part in files for name, size in part.items()}
            manifest = {"step": step, "world_size": cdist.world_size(), "files": listed,
                        **{k: client_state[k] for k in ("zero_stage", "model") if k in client_state}}
            write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
            write_atomic(self.directory / "latest", tag)
            for old in self.complete_tags()[: -self.keep_last]:
                if old != tag:
                    self._discard(self.directory / old)
                    self._discard(self.directory / (old + UNIVERSAL_SUFFIX))
        cdist.barrier()

    @staticmethod
    def _discard(path: Path) -> None:
        if not path.exists():
            return
        trash = path.with_name(path.name + ".deleting")
        if trash.exists():
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(path, trash)  # atomic: the tag disappears whole before its files do
        shutil.rmtree(trash, ignore_errors=True)

    def find(self, resume: str) -> tuple[Path, str, dict[str, Any]] | None:
        """What to resume from: `auto` = this run's latest complete checkpoint; `none`; or a checkpoint path."""
        if resume == "none":
            if self.latest():
                raise CheckpointError(f"checkpoint.resume: none, but {self.directory} already holds checkpoints of "
                                      f"an earlier run; choose another run.name or output_dir, or resume "
                                      f"(checkpoint.resume: auto)")
            return None
        if resume == "auto":
            tag = self.latest()
            if tag is None:
                return None
            return self.directory, tag, verify(self.directory / tag)
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint.resume: {resume} is not a checkpoint directory")
        if (path / "latest").is_file():
            sub = Checkpointer(path, self.keep_last)
            tag = sub.latest()
            if tag is None:
                raise CheckpointError(f"checkpoint.resume: {resume} holds no complete checkpoint")
            return path, tag, verify(path / tag)
        return path.parent, path.name, verify(path)


def to_universal(directory: Path, tag: str) -> str:
    """Convert a checkpoint to DeepSpeed's universal format once (rank 0 only); returns the universal tag."""
    out = directory / (tag + UNIVERSAL_SUFFIX)
    if read_manifest(out) is not None:
        return out.name
    if out.exists():
        Checkpointer._discard(out)
    log(f"converting checkpoint {directory / tag} to DeepSpeed's universal format (another world size) ...")
    tmp = directory / (tag + UNIVERSAL_SUFFIX + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                           "--input_folder", str(directory / tag), "--output_folder", str(tmp),
                           "--num_extract_workers", "1", "--num_merge_workers", "1"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise CheckpointError(f"checkpoint {directory / tag} was written by another number of ranks and cannot be "
                              f"converted to DeepSpeed's universal format: {last}")
    for f in tmp.rglob("*"):
        if f.is_file():
            fsync_file(f)
    write_atomic(tmp / MANIFEST, json.dumps({"universal_of": tag, "files": _files(tmp)}, indent=1))
    os.replace(tmp, out)
    fsync_dir(directory)
    return out.name


def truncate_metrics(path: Path, step: int) -> int:
    """Drop metric lines written after `step` (a run killed after its last checkpoint logged steps it will redo);
    returns how many lines were dropped. Rank 0 only."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            s = json.loads(line).get("step", 0)
        except ValueError:  # a line cut by a kill: never valid
            dropped += 1
            continue
        if s <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_atomic(path, "".join(x + "\n" for x in kept))
    return dropped
