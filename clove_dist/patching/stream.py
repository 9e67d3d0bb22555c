"""Streaming interpolation of two weight sources into safetensors, and the safetensors layout itself.

    w = (1 - alpha) * w_pretrained + alpha * w_finetuned        (alpha = 0.6 in the paper)

    patch_files("base.safetensors", "runs/clove/checkpoints", 0.6, "patched.safetensors")
    open_clip.create_model("ViT-B-32", pretrained="patched.safetensors")

Tensor by tensor: both inputs are memory-mapped (safetensors, torch.load with mmap=True for .pt/.bin, DeepSpeed
checkpoints through checkpoint.py), the output header is written first and each interpolated tensor is appended as
soon as it is computed, so peak memory is about one tensor, not one model. The output goes to a temporary name and
is renamed at the end: an interrupted patch never leaves a half-written file under the final name.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import UserError

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


class PatchError(UserError):
    """Inputs that cannot be interpolated: missing files, different architectures, a bad alpha."""


class TensorSource(Mapping):
    """Read-only, lazily loaded tensors of a weights file (.safetensors, .pt, .pth, .bin).

    Keys are open_clip's: a `module.` prefix (DDP) and the `clip.` prefix of the training module (DeepSpeed's
    zero_to_fp32 output) are removed; state outside the CLIP model in such a file is ignored."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise PatchError(f"checkpoint not found: {self.path}")
        try:
            if self.path.endswith(".safetensors"):
                from safetensors import safe_open
                self._st = safe_open(self.path, framework="pt", device="cpu")
                self._keys = list(self._st.keys())
                self._state = None
            else:
                obj = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
                if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
                    obj = obj["state_dict"]
                if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
                    raise PatchError(f"{self.path} does not hold a state dict of tensors")
                self._state = obj
                self._keys = list(obj)
                self._st = None
            self._names = _open_clip_names(self._keys)
            self._keys = list(self._names)
            self._keyset = frozenset(self._keys)
        except PatchError:
            raise
        except Exception as e:  # unreadable or corrupt file, of any kind
            raise PatchError(f"cannot read checkpoint {self.path}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None

    def __getitem__(self, key: str) -> torch.Tensor:
        key = self._names[key]
        if self._st is not None:
            return self._st.get_tensor(key)
        return self._state[key]

    def __contains__(self, key: object) -> bool:
        return key in self._keyset

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        key = self._names[key]
        if self._st is not None:
            sl = self._st.get_slice(key)
            name = sl.get_dtype()
            dtype = next(d for d, n in _ST_DTYPES.items() if n == name)
            return tuple(sl.get_shape()), dtype
        t = self._state[key]
        return tuple(t.shape), t.dtype


def _open_clip_names(keys: list[str]) -> dict[str, str]:
    """open_clip key -> stored key."""
    keys = [k for k in keys]
    strip = [k[len("module."):] if k.startswith("module.") else k for k in keys]
    if any(k.startswith("clip.") for k in strip):
        return {k[len("clip."):]: orig for k, orig in zip(strip, keys) if k.startswith("clip.")}
    return dict(zip(strip, keys))


_CONSOLIDATED = ("model.safetensors", "pytorch_model.bin")  # zero_to_fp32's names, unsharded


class ShardedTensorSource(Mapping):
    """zero_to_fp32's sharded output: `<name>.index.json` maps every tensor to one of several files."""

    def __init__(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PatchError(f"cannot read {index}: {type(e).__name__}: {e}") from None
        self._files = {f: TensorSource(index.parent / f) for f in dict.fromkeys(weight_map.values())}
        self._where = {k: src for src in self._files.values() for k in src}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._where[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self._where[key].shape_dtype(key)


def open_weights(path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    """A weights file, a DeepSpeed checkpoint directory (a run's checkpoints/ or one tag in it), or the directory
    DeepSpeed's zero_to_fp32 writes (model.safetensors / pytorch_model.bin, or their sharded index)."""
    p = Path(path)
    if p.is_dir():
        for name in _CONSOLIDATED:
            if (p / name).is_file():
                return TensorSource(p / name)
            if (p / f"{name}.index.json").is_file():
                return ShardedTensorSource(p / f"{name}.index.json")
        from .checkpoint import DeepSpeedCheckpoint
        return DeepSpeedCheckpoint(p)
    return TensorSource(path)


def patched_name(alpha: float) -> str:
    """File name of the weights patched at `alpha`: distinct for distinct alphas (0.6 -> patched_alpha0.6...)."""
    return f"patched_alpha{check_alpha(alpha, allow_extrapolation=True):g}.safetensors"


def check_alpha(alpha: float, allow_extrapolation: bool = False) -> float:
    """alpha as a float; PatchError outside [0, 1] (beyond it the result leaves the segment between the two models,
    which the user must ask for) or when not finite."""
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
        raise PatchError(f"alpha must be a finite number, got {alpha!r}")
    if not allow_extrapolation and not 0.0 <= alpha <= 1.0:
        raise PatchError(f"alpha must be in [0, 1], got {alpha!r} (pass --allow-extrapolation to go outside)")
    return float(alpha)


def check_compatible(pre: Mapping[str, Any], fine: Mapping[str, Any], shape_of=None) -> None:
    """Same keys and shapes (scalar-vs-[1] logit_scale counts as the same); PatchError naming the first mismatch."""
    missing = [k for k in pre if k not in fine]
    extra = [k for k in fine if k not in pre]
    if missing or extra:
        what = f"{len(missing)} tensors missing from the fine-tuned checkpoint (first: {missing[0]})" if missing \
            else f"{len(extra)} unexpected tensors in the fine-tuned checkpoint (first: {extra[0]})"
        raise PatchError(f"checkpoints are of different models: {what}")
    shape_of = shape_of or (lambda src, k: tuple(src[k].shape))
    for k in pre:
        a, b = shape_of(pre, k), shape_of(fine, k)
        if a != b and not (math.prod(a) == 1 and math.prod(b) == 1):
            raise PatchError(f"checkpoints are of different models: {k} has shape {list(a)} vs {list(b)}")


def interpolate_tensor(pre: torch.Tensor, fine: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * pre + alpha * fine in fp32, returned in the pre-trained tensor's dtype and shape."""
    if not pre.is_floating_point():
        return pre.clone()
    out = torch.lerp(pre.float(), fine.float().reshape(pre.shape), alpha)
    return out.to(pre.dtype)


def interpolate_state(pre: Mapping[str, torch.Tensor], fine: Mapping[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """In-memory interpolation of two state dicts of the same model."""
    alpha = check_alpha(alpha)
    check_compatible(pre, fine)
    return {k: interpolate_tensor(pre[k], fine[k], alpha) for k in pre}


def partial_path(path: Path) -> Path:
    """Where a file is written before it is renamed into place: the final name only ever holds a whole file."""
    return path.with_name(path.name + ".partial")


def safetensors_header(specs: list[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str] | None = None
                       ) -> tuple[bytes, list[tuple[str, tuple[int, ...], torch.dtype, int, int]]]:
    """The bytes before the data section and, per tensor, (name, shape, dtype, file offset, nbytes).

    A pure function of its arguments: every rank that knows the names, shapes and dtypes computes the same header
    and the same offsets, which is what lets ranks write their byte ranges of one file independently.
    Layout (the safetensors format): 8-byte little-endian header length, a JSON header mapping each name to its
    dtype, shape and [begin, end) byte offsets in the data section, then the raw little-endian tensor bytes.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    rel = []
    for name, shape, dtype in specs:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        rel.append((name, tuple(shape), dtype, offset, nbytes))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
    raw = struct.pack("<Q", len(raw)) + raw
    return raw, [(n, sh, dt, len(raw) + off, nb) for n, sh, dt, off, nb in rel]


class StreamingSafetensorsWriter:
    """Writes a .safetensors file whose tensor list is known up front, one tensor at a time (layout: see
    safetensors_header)."""

    def __init__(self, path: str | os.PathLike, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.tmp = partial_path(self.path)
        raw, entries = safetensors_header(specs, metadata)
        self.order = [(name, shape, dtype, nbytes) for name, shape, dtype, _, nbytes in entries]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.tmp, "wb")
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, shape, dtype, nbytes = self.order[self._next]
        assert name == exp_name and tuple(tensor.shape) == shape and tensor.dtype == dtype, (name, exp_name)
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert len(data) == nbytes
        self._f.write(data)
        self._next += 1

    def close(self) -> Path:
        assert self._next == len(self.order), "not every tensor was written"
        self._f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


@contextmanager
def streaming_writer(path, specs, metadata=None):
    w = StreamingSafetensorsWriter(path, specs, metadata)
    try:
        yield w
    except BaseException:
        w.abort()
        raise
    w.close()


def save_state(state: Mapping[str, torch.Tensor], path: str | os.PathLike,
               metadata: dict[str, str] | None = None) -> Path:
    """Write a state dict as .safetensors (atomically: temporary name, then rename)."""
    specs = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    with streaming_writer(path, specs, metadata) as w:
        for k, v in state.items():
            w.write(k, v)
    return Path(path)


def check_output(out: str | os.PathLike, overwrite: bool) -> None:
    if not str(out).endswith(".safetensors"):
        raise PatchError(f"--out must be a .safetensors file, got {out}")
    if os.path.exists(out) and not overwrite:
        raise PatchError(f"{out} exists; pass --overwrite to replace it")


def patch_files(pretrained: str, finetuned: str, alpha: float, out: str, *, progress: bool = True,
                allow_extrapolation: bool = False, overwrite: bool = True) -> Path:
    """Stream-interpolate two weights files or checkpoints into `out` (.safetensors); peak memory about one
    tensor. Either input may be a DeepSpeed checkpoint directory or zero_to_fp32's consolidated file."""
    alpha = check_alpha(alpha, allow_extrapolation)
    check_output(out, overwrite)
    pre, fine = open_weights(pretrained), open_weights(finetuned)
    check_compatible(pre, fine, shape_of=lambda src, k: src.shape_dtype(k)[0])
    specs = [(k, *pre.shape_dtype(k)) for k in pre]
    meta = {"alpha": str(alpha), "pretrained": os.path.basename(pretrained), "finetuned": os.path.basename(finetuned)}
    with streaming_writer(out, specs, meta) as w:
        for k in tqdm(list(pre), desc=f"patch alpha={alpha}", unit="tensor", disable=not progress):
            w.write(k, interpolate_tensor(pre[k], fine[k], alpha))
    return Path(out)
