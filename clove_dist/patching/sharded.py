"""In-run sharded export and patching: every rank writes the fp32 master values it owns, nobody gathers a model.

Called on every rank at the end of training (a collective):

    paths = export_sharded(clip, original_shapes, "ViT-B-32", "base.safetensors", alphas=[0.6],
                           out_dir=run_dir / "export", seed=cfg.run.seed)

writes finetuned.safetensors, one patched_alpha<A>.safetensors per alpha and open_clip_config.json.

How (shared output directory, the usual case on a cluster file system):
1. every rank computes the same safetensors header from the parameter names, their original shapes (logit_scale
   back to 0-dim) and dtypes, so every rank knows every tensor's byte offset;
2. rank 0 creates each output under `<name>.partial`, writes the header and sizes the file; barrier;
3. each rank takes the fp32 master values it owns (ZeRO-1/2: its optimizer fragment `p._hp_mapping`; ZeRO-3: its
   local partition, small persistent parameters included, padding cut off; no ZeRO: rank 0 holds everything),
   reads the same element range of the pre-trained file with `pread`, lerps, and `pwrite`s the bytes at their
   offset; fsync. (pread rather than a memory map: it reads exactly the slice, and no page of the file stays
   mapped into the process's resident set.)
4. the ranks agree that every one of them wrote all its ranges (an all-reduce, also reached by a rank that
   failed); only then does rank 0 rename every `.partial` into place. An interrupted export leaves only
   `.partial` files; a rerun recreates them from scratch.

Peak extra host memory per rank: a pre-trained slice and a lerp result of at most CHUNK_NUMEL elements each (the
fragment itself is a view of the optimizer's fp32 partition on CPU), far below one model.

When the directory is not shared by all ranks (detected: rank 0 writes a token file the others look for), the
values stream through rank 0 one parameter at a time (each rank contributes its fragment to a full-size buffer of
that one parameter) and rank 0 writes the files alone.

When the run did not start from a local weights file (random init, or an open_clip tag), rank 0 rebuilds the
weights training started from, seeded as training seeded them, and writes them once to a hidden file next to the
outputs that every rank then reads like any pre-trained file (rank 0 briefly holds that one fp32 model). A .pt/.bin
file is likewise copied once, tensor by tensor, into such a hidden safetensors file.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import struct
from collections.abc import Sequence
from typing import Any
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import fsync_dir
from .stream import (_ST_DTYPES, PatchError, check_alpha, partial_path, patched_name, safetensors_header,
                     save_state)

FINETUNED_NAME = "finetuned.safetensors"
_BASE_NAME = ".pretrained_init.safetensors"
CHUNK_NUMEL = 1 << 22  # elements interpolated at a time: 16 MB of fp32 per buffer
_DTYPE_OF = {v: k for k, v in _ST_DTYPES.items()}


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def _agree(local_ok: bool) -> bool:
    """True when every rank says True (a MIN over ranks)."""
    if _rank_world()[1] == 1:
        return local_ok
    t = torch.tensor([1 if local_ok else 0], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _from_rank0(value):
    if _rank_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class SafetensorsSlices:
    """Element ranges of the tensors of a .safetensors file, read with pread: nothing else of the file is loaded."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise PatchError(f"cannot read {self.path} as safetensors: {type(e).__name__}: {e}") from None
        header.pop("__metadata__", None)
        self.entries = {k: (tuple(v["shape"]), _DTYPE_OF[v["dtype"]], 8 + n + v["data_offsets"][0])
                        for k, v in header.items()}
        self._fd = os.open(self.path, os.O_RDONLY)

    def read(self, name: str, start: int, numel: int) -> torch.Tensor:
        """Elements [start, start + numel) of tensor `name` flattened, as fp32."""
        _, dtype, offset = self.entries[name]
        size = torch.empty((), dtype=dtype).element_size()
        buf = bytearray(numel * size)
        view, pos, got = memoryview(buf), offset + start * size, 0
        while got < len(buf):
            n = os.preadv(self._fd, [view[got:]], pos + got)
            if n <= 0:
                raise PatchError(f"{self.path} is truncated (tensor {name})")
            got += n
        if not buf:
            return torch.empty(0, dtype=torch.float32)
        return torch.frombuffer(buf, dtype=dtype).float()

    def close(self) -> None:
        os.close(self._fd)


def _pwrite_all(fd: int, tensor: torch.Tensor, offset: int) -> None:
    data = memoryview(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(data):  # one pwrite moves at most ~2 GiB on Linux
        done += os.pwrite(fd, data[done:], offset + done)


def _entries(clip: nn.Module, original_shapes: dict[str, torch.Size]
             ) -> list[tuple[str, torch.Tensor, tuple, torch.dtype]]:
    """(name, parameter or buffer, shape to write, dtype to write), in state_dict order."""
    params = dict(clip.named_parameters())
    buffers = {}
    for name, b in clip.named_buffers():
        module_name, _, attr = name.rpartition(".")
        owner = clip.get_submodule(module_name) if module_name else clip
        if attr not in owner._non_persistent_buffers_set:
            buffers[name] = b
    out = []
    for name in clip.state_dict(keep_vars=True):
        t = params.get(name, buffers.get(name))
        if t is None:
            continue
        shape = tuple(original_shapes.get(name, _full_shape(t)))
        dtype = torch.float32 if t.is_floating_point() else t.dtype
        out.append((name, t, shape, dtype))
    return out


def _full_shape(t: torch.Tensor) -> torch.Size:
    return t.ds_shape if hasattr(t, "ds_shape") else t.shape


def local_fragment(p: torch.Tensor, rank: int) -> tuple[int, torch.Tensor] | None:
    """(start, values): the fp32 master values of `p` this rank owns, as a flat range of the full tensor (a view,
    on the device where they live: the caller copies them to the host a chunk at a time)."""
    if hasattr(p, "ds_id"):  # ZeRO-3: the local partition, persistent small parameters included
        from deepspeed.utils import safe_get_local_fp32_param
        local = safe_get_local_fp32_param(p) if p.requires_grad else p.ds_tensor
        part = p.ds_tensor.ds_numel  # every rank's partition has this size; the last one is padded
        start = dist.get_rank(group=p.ds_process_group) * part
        numel = min(part, p.ds_numel - start)
        if numel <= 0:
            return None
        return start, local.detach().reshape(-1)[:numel]
    if hasattr(p, "_hp_mapping"):  # ZeRO-1/2 (and the bf16 optimizer): this rank's optimizer fragment
        mapping = p._hp_mapping
        if mapping is None:
            return None
        return mapping.lp_fragment_address.start, mapping.hp_fragment.detach().reshape(-1)
    # no ZeRO partitioning: every rank holds the full tensor; rank 0 writes it
    return (0, p.detach().reshape(-1)) if rank == 0 else None


def _full_tensor(p: torch.Tensor, rank: int) -> torch.Tensor | None:
    """The whole fp32 tensor on rank 0 (collective: every rank calls it; the others get None)."""
    if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
        from deepspeed.utils import safe_get_full_fp32_param
        value = safe_get_full_fp32_param(p) if p.requires_grad else None
        if value is None:  # a frozen parameter has no master copy: the model's own values
            value = _gather_frozen(p)
        return value.detach().reshape(-1).float().cpu() if rank == 0 else None
    return p.detach().reshape(-1).float().cpu() if rank == 0 else None


def _gather_frozen(p: torch.Tensor) -> torch.Tensor:
    if hasattr(p, "ds_id"):
        import deepspeed
        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().clone()
    return p.detach()


def _dir_is_shared(out_dir: Path) -> bool:
    """Whether every rank sees the same out_dir: rank 0 writes a random token, the others must read it back."""
    rank, world = _rank_world()
    if world == 1:
        return True
    token = _from_rank0(secrets.token_hex(16) if rank == 0 else None)
    probe = out_dir / f".shared-{token}"
    if rank == 0:
        probe.write_text(token)
    _barrier()
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    shared = _agree(seen)
    _barrier()
    if rank == 0:
        probe.unlink(missing_ok=True)
    return shared


def _prepare_pretrained(pretrained: str | None, model_name: str, seed: int, out_dir: Path,
                        model_cfg=None) -> tuple[str, bool, bool]:
    """(path of the weights training started from, whether it is a temporary file to delete at the end, whether
    every rank can read it)."""
    rank, _ = _rank_world()
    path = out_dir / _BASE_NAME
    if _from_rank0(bool(pretrained) and os.path.isfile(str(pretrained))):
        if str(pretrained).endswith(".safetensors"):
            return str(pretrained), False, _agree(os.path.isfile(str(pretrained)))
        # .pt/.bin: rank 0 copies it once, tensor by tensor, into safetensors, whose byte ranges pread can reach
        problem = None
        if rank == 0:
            try:
                _to_safetensors(str(pretrained), path)
            except PatchError as e:
                problem = str(e)
        problem = _from_rank0(problem)
        if problem:
            raise PatchError(problem)
        return str(path), True, _agree(path.is_file())
    # random init or an open_clip tag: rebuild the seeded start of training once, on rank 0
    if rank == 0:
        from ..config import ModelConfig
        from ..model import create
        torch.manual_seed(seed)
        base = create(model_cfg or ModelConfig(name=model_name, pretrained=pretrained or ""))[0]
        state = {k: v.float() if v.is_floating_point() else v for k, v in base.state_dict().items()}
        del base
        save_state(state, path)
        del state
    _barrier()
    return str(path), True, _agree(path.is_file())


def _to_safetensors(source: str, path: Path) -> None:
    from .stream import TensorSource, streaming_writer
    src = TensorSource(source)
    specs = [(k, *src.shape_dtype(k)) for k in src]
    with streaming_writer(path, specs) as w:
        for k in src:
            w.write(k, src[k])


def _check_pretrained(path: str, specs: list[tuple[str, tuple, torch.dtype]]) -> str | None:
    """None when `path` holds the tensors of `specs` (by name and element count), else one line saying why not."""
    if not path.endswith(".safetensors"):
        return f"the pre-trained weights must be a .safetensors file for sharded patching, got {path}"
    try:
        src = SafetensorsSlices(path)
    except PatchError as e:
        return str(e)
    src.close()
    for name, shape, _ in specs:
        if name not in src.entries:
            return f"pre-trained weights {path} are of a different model: no tensor {name}"
        got = src.entries[name][0]
        if math.prod(got) != math.prod(shape):
            return f"pre-trained weights {path} are of a different model: {name} has shape {list(got)} vs {list(shape)}"
    return None


def export_sharded(clip: nn.Module, original_shapes: dict[str, torch.Size], model_name: str,
                   pretrained: str | None, alphas: Sequence[float], out_dir: str | os.PathLike, seed: int,
                   *, model_cfg=None, force_streaming: bool = False, engine: Any = None,
                   allow_extrapolation: bool = False) -> list[Path]:
    """Write finetuned.safetensors and patched_alpha<A>.safetensors for every alpha into out_dir (collective).

    clip: the model the engine wraps (parameters under ZeRO management); original_shapes: what
    model.make_deepspeed_safe returned; pretrained: the local weights file training started from, or an open_clip
    tag / None (then the seeded init is rebuilt with `seed`).
    model_cfg: the run's ModelConfig, if any: the init is then rebuilt exactly as training built it (e.g. its
    precision_init). force_streaming: take the rank-0 streaming path even when out_dir is shared (tests).
    engine: the DeepSpeed engine, whose ZeRO-0 bf16/fp16 optimizer keeps the fp32 master copies outside the
    parameters (clove_dist.zero.zero0_masters): those are exported, not the rounded working copies.
    Returns the written paths (they exist on rank 0's file system; on every rank when out_dir is shared).
    """
    rank, world = _rank_world()
    alphas = [check_alpha(a, allow_extrapolation) for a in alphas]
    out_dir = Path(out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    _barrier()
    entries = _entries(clip, original_shapes)
    if engine is not None:
        from ..zero import zero0_masters
        masters = zero0_masters(engine)
        entries = [(name, masters.get(id(t), t), shape, dtype) for name, t, shape, dtype in entries]
    specs = [(name, shape, dtype) for name, _, shape, dtype in entries]
    shared = _dir_is_shared(out_dir) and not force_streaming
    base, temporary, everywhere = None, False, True
    if alphas:
        base, temporary, everywhere = _prepare_pretrained(pretrained, model_name, seed, out_dir, model_cfg)
    shared = shared and everywhere  # a weights file only rank 0 sees: stream through rank 0
    if rank == 0 and any(0 < a < 1 for a in alphas):
        from ..log import warn_once
        from .batchnorm import interpolated_statistics_warning
        warning = interpolated_statistics_warning([name for name, *_ in specs],
                                                  "clove-dist patch --model ... --bn-shards ... on the export")
        if warning:
            warn_once(warning)
    outputs: list[tuple[Path, float | None, dict[str, str]]] = [(out_dir / FINETUNED_NAME, None, {"model": model_name})]
    outputs += [(out_dir / patched_name(a), a, {"model": model_name, "alpha": str(a)}) for a in alphas]
    try:
        problem = _from_rank0(_check_pretrained(base, specs) if rank == 0 and base else None)
        if problem:
            raise PatchError(problem)
        if world > 1 and not shared and rank == 0:
            from ..log import warn_once
            warn_once(f"{out_dir} or the pre-trained weights are not shared by all ranks (or streaming was forced): "
                      f"streaming the export through rank 0, one parameter at a time")
        if shared:
            _write_sharded(entries, specs, outputs, base, rank)
        else:
            _write_streamed(entries, specs, outputs, base, rank)
        if rank == 0:
            from ..model import write_export_config
            write_export_config(out_dir, model_name)
    finally:
        _barrier()  # every rank arrives here, having failed or not: no collective is left half-entered
        if temporary and rank == 0:
            Path(base).unlink(missing_ok=True)
    return [path for path, _, _ in outputs]


def _write_sharded(entries, specs, outputs, base: str | None, rank: int) -> None:
    headers = [safetensors_header(specs, meta) for _, _, meta in outputs]
    if rank == 0:  # create and size every file; the data section starts as zeros (a sparse hole)
        for (path, _, _), (raw, layout) in zip(outputs, headers):
            size = layout[-1][3] + layout[-1][4] if layout else len(raw)
            with open(partial_path(path), "wb") as f:
                f.write(raw)
                f.truncate(size)
    _barrier()
    fds = [os.open(partial_path(path), os.O_WRONLY) for path, _, _ in outputs]
    pre = SafetensorsSlices(base) if base else None
    wrote_all = False
    try:
        for i, (name, tensor, _, dtype) in enumerate(entries):
            frag = local_fragment(tensor, rank) if isinstance(tensor, nn.Parameter) else \
                ((0, tensor.detach().reshape(-1).cpu()) if rank == 0 else None)
            if frag is None:
                continue
            start, values = frag
            size = torch.empty((), dtype=dtype).element_size()
            # in chunks, so that the pre-trained slice and the lerp result stay small whatever the fragment
            for lo in range(0, values.numel(), CHUNK_NUMEL):
                part = values[lo:lo + CHUNK_NUMEL].cpu()
                part = part.float() if part.is_floating_point() else part
                pre_part = pre.read(name, start + lo, part.numel()) \
                    if pre is not None and len(outputs) > 1 and part.is_floating_point() else None
                for fd, (_, layout), (_, a, _) in zip(fds, headers, outputs):
                    v = part if a is None or not part.is_floating_point() else torch.lerp(pre_part, part, a)
                    _pwrite_all(fd, v.to(dtype) if v.is_floating_point() else v, layout[i][3] + (start + lo) * size)
        for fd in fds:
            os.fsync(fd)
        wrote_all = True
    finally:
        for fd in fds:
            os.close(fd)
        if pre is not None:
            pre.close()
        # every rank's bytes are on disk before any file takes its final name; a rank that failed says so here
        # (and then raises), so no rank renames a file another rank did not finish
        everyone = _agree(wrote_all)
    if not everyone:
        raise PatchError("export failed on another rank; the outputs were left under their .partial names")
    if rank == 0:
        for path, _, _ in outputs:
            os.replace(partial_path(path), path)
        fsync_dir(outputs[0][0].parent)


def _write_streamed(entries, specs, outputs, base: str | None, rank: int) -> None:
    """Rank 0 writes every file alone; the other ranks contribute their fragment of one parameter at a time."""
    from .stream import StreamingSafetensorsWriter
    writers = [StreamingSafetensorsWriter(path, specs, meta) for path, _, meta in outputs] if rank == 0 else []
    pre = SafetensorsSlices(base) if rank == 0 and base else None
    error: Exception | None = None
    try:
        for name, tensor, shape, dtype in entries:
            full = _full_tensor(tensor, rank) if isinstance(tensor, nn.Parameter) else \
                (tensor.detach().reshape(-1).cpu() if rank == 0 else None)
            if rank != 0 or error is not None:
                continue  # a failed rank 0 still joins every gather, so the others do not wait forever
            try:
                if full.is_floating_point():
                    pre_full = pre.read(name, 0, full.numel()) if pre is not None and len(outputs) > 1 else None
                    for w, (_, a, _) in zip(writers, outputs):
                        w.write(name, (full if a is None else torch.lerp(pre_full, full, a)).to(dtype).reshape(shape))
                else:
                    for w in writers:
                        w.write(name, full.reshape(shape))
            except Exception as e:  # e.g. a full disk: stop writing, keep the collectives in step
                error = e
        if error is None:
            for w in writers:
                w._f.flush()
                os.fsync(w._f.fileno())
                w.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        if pre is not None:
            pre.close()
    if error is not None:
        for w in writers:
            w.abort()
        raise error
    if writers:
        fsync_dir(outputs[0][0].parent)
