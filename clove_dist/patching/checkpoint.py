"""DeepSpeed checkpoints of any ZeRO stage and world size, read one parameter at a time.

    source = DeepSpeedCheckpoint("runs/base/checkpoints")   # the tag in `latest`; or a tag directory, or runs/base
    source["visual.conv1.weight"]                                   # fp32, assembled from every rank's partition

A tag directory holds `*model_states.pt` (parameter names and shapes per optimizer group, buffers, ZeRO-0
weights) and one `*optim_states.pt` per data-parallel rank with that rank's fp32 master partition of every group:

- ZeRO-1/2: each group's parameters are flattened one after the other (with the per-parameter alignment padding
  DeepSpeed records), padded at the end, and cut into `world` equal consecutive partitions;
- ZeRO-3: every parameter is cut into `world` equal partitions of ceil(numel / world) elements (the last padded),
  and each rank's group partition is its slices of the group's parameters, one after the other.

Every file is opened with torch.load(mmap=True): assembling a parameter reads only its slices, so peak memory is
about one parameter, whatever the model or world size. Names lose the training wrapper's `clip.` prefix, and
the 0-dim parameters that training reshaped to [1] (logit_scale, logit_bias) get their open_clip shape back.
torch.load runs with weights_only=False because DeepSpeed pickles its own classes into these files: read only
checkpoints you trust, as DeepSpeed itself does.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .stream import PatchError

PREFIX = "clip."
ZERO_DIM = ("logit_scale", "logit_bias")  # open_clip's 0-dim parameters, [1] inside DeepSpeed


def open_clip_name(name: str) -> str | None:
    """The open_clip key of a name in the training module, or None for state outside the CLIP model."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else None


def open_clip_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return () if name in ZERO_DIM and shape == (1,) else shape


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / "latest").is_file() or any(p.glob("*model_states.pt")))


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise PatchError(f"cannot read DeepSpeed checkpoint file {path}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None


class DeepSpeedCheckpoint(Mapping):
    """The fp32 weights of a DeepSpeed checkpoint as a read-only mapping of open_clip names to tensors."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.dir = self._resolve(Path(path))
        model_files = sorted(self.dir.glob("*model_states.pt"))
        optim_files = sorted(self.dir.glob("*optim_states.pt"), key=self._rank_of)
        if not model_files:
            raise PatchError(f"{path} is not a DeepSpeed checkpoint: no *model_states.pt in {self.dir}")
        states = _load(model_files[0])
        if not isinstance(states, dict) or "module" not in states:
            raise PatchError(f"{model_files[0]} is not a DeepSpeed model-states file")
        self._module = states["module"]
        self.world = int(states.get("dp_world_size", 1))
        self._optim = [_load(f)["optimizer_state_dict"] for f in optim_files] if optim_files else []
        self.stage = int(self._optim[0].get("zero_stage", 0)) if self._optim else 0
        if self.stage and len(self._optim) != self.world:
            raise PatchError(f"{self.dir} is incomplete: {len(self._optim)} optimizer shards for "
                             f"{self.world} data-parallel ranks")
        # name -> (group, offset, numel, shape): offset in the flat group (ZeRO-1/2) or in a rank's group
        # partition (ZeRO-3)
        self._index: dict[str, tuple[int, int, int, tuple[int, ...]]] = {}
        if self.stage in (1, 2):
            for g, shapes in enumerate(states["param_shapes"]):
                pads = self._optim[0].get("param_alignment_paddings", [[0] * len(shapes)] * (g + 1))[g]
                offset = 0
                for (name, shape), pad in zip(shapes.items(), pads):
                    self._index[name] = (g, offset, math.prod(shape), tuple(shape))
                    offset += math.prod(shape) + pad
        elif self.stage == 3:
            for g, shapes in enumerate(states["param_shapes"]):
                offset = 0
                for name, shape in shapes.items():
                    part = math.ceil(math.prod(shape) / self.world)
                    self._index[name] = (g, offset, math.prod(shape), tuple(shape))
                    offset += part
        buffers = set(states.get("buffer_names") or [])
        self._keys: list[str] = []
        self._source: dict[str, str] = {}
        for name in list(self._index) + [n for n in self._module if n not in self._index]:
            key = open_clip_name(name)
            if key is None or key in self._source:
                continue
            if name not in self._index and self.stage and name not in buffers:
                continue  # a parameter without a master copy in this checkpoint
            self._keys.append(key)
            self._source[key] = name
        if not self._keys:
            raise PatchError(f"{self.dir} holds no CLIP weights (no parameter named {PREFIX}...)")
        self._flat = "fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups"

    @staticmethod
    def _resolve(path: Path) -> Path:
        if not path.is_dir():
            raise PatchError(f"{path} is not a DeepSpeed checkpoint directory")
        if (path / "checkpoints" / "latest").is_file():  # a run directory
            path = path / "checkpoints"
        if (path / "latest").is_file():
            tag = (path / "latest").read_text().strip()
            if not (path / tag).is_dir():
                raise PatchError(f"{path}/latest names {tag!r}, which is not a directory there")
            return path / tag
        if not any(path.glob("*model_states.pt")):
            raise PatchError(f"{path} is not a DeepSpeed checkpoint directory (no `latest`, no *model_states.pt)")
        return path

    @staticmethod
    def _rank_of(path: Path) -> int:
        m = re.search(r"zero_pp_rank_(\d+)_", path.name)
        return int(m.group(1)) if m else 0

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._source

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        name = self._source[key]
        if name in self._index:
            return open_clip_shape(key, self._index[name][3]), torch.float32
        t = self._module[name]
        return open_clip_shape(key, tuple(t.shape)), t.dtype

    def __getitem__(self, key: str) -> torch.Tensor:
        name = self._source[key]
        shape, _ = self.shape_dtype(key)
        if name not in self._index:  # a buffer, or a ZeRO-0 parameter: the model-states file holds it whole
            return self._module[name].reshape(shape).clone()
        g, offset, numel, _ = self._index[name]
        out = torch.empty(numel, dtype=torch.float32)
        if self.stage == 3:
            part = math.ceil(numel / self.world)
            for r in range(self.world):
                n = min(part, numel - r * part)
                if n > 0:
                    out[r * part: r * part + n] = self._optim[r][self._flat][g][offset: offset + n]
        else:
            part = self._optim[0][self._flat][g].numel()  # every rank's partition has the same size
            pos = offset
            while pos < offset + numel:
                r, within = divmod(pos, part)
                n = min(part - within, offset + numel - pos)
                out[pos - offset: pos - offset + n] = self._optim[r][self._flat][g][within: within + n]
                pos += n
        return out.reshape(shape)
