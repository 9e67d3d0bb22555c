"""The open_clip model factory: architecture by name, weights from an open_clip tag or a local file.

    model, preprocess_train, preprocess_val, tokenizer = create(ModelConfig(name="ViT-B-32", pretrained="openai"))
    model, ... = create(ModelConfig(name="clove-tiny", pretrained="runs/base/export/finetuned.safetensors"))

Besides open_clip's own architectures, the small configs in clove_dist/model_configs/ (clove-tiny and clove-micro,
small ViTs for tests; clove-tiny-rn, a small ResNet with BatchNorm, open_clip's ModifiedResNet, for the demo) are
registered with open_clip at import, so `open_clip.create_model("clove-tiny", pretrained=path)` works once this
module is imported. No model hub is needed when `pretrained` is a local path.

DeepSpeed cannot handle 0-dim parameters (open_clip's logit_scale): `make_deepspeed_safe` turns them into shape
[1] before the engine is built, and `restore_shapes` puts the original shapes back on export.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from torch import nn

from .config import ModelConfig
from .errors import UserError

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class ModelError(UserError):
    """A user mistake about the model: unknown architecture, missing or mismatching weights."""


def model_config(name: str) -> dict[str, Any]:
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        known = open_clip.list_models()
        import difflib
        near = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise ModelError(f"model.name: unknown architecture {name!r}{hint}; see open_clip.list_models()")
    return cfg


def _check_pretrained(pretrained: str, name: str) -> None:
    if not pretrained:
        return
    looks_like_path = os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES)
    if looks_like_path and not os.path.isfile(pretrained):
        raise ModelError(f"model.pretrained: weights file not found: {pretrained}")
    if not looks_like_path and pretrained not in open_clip.list_pretrained_tags_by_model(name):
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ModelError(f"model.pretrained: {pretrained!r} is neither a file nor a known tag of {name} "
                         f"(tags: {', '.join(tags) or 'none'})")
    if not looks_like_path:
        _check_activation(name, pretrained)


def _check_activation(name: str, tag: str) -> None:
    """Weights trained with QuickGELU (OpenAI's, some LAION ones) in a GELU architecture load without error and
    silently compute something else (open_clip only warns): refuse the mismatch. (A -quickgelu architecture lists
    only QuickGELU tags, so the reverse is refused as an unknown tag.)"""
    trained_quick = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
    if trained_quick and not model_config(name).get("quick_gelu", False):
        hint = f"use model.name: {name}-quickgelu" if open_clip.get_model_config(f"{name}-quickgelu") else \
            "use the -quickgelu variant of the architecture"
        raise ModelError(f"model.pretrained: {tag!r} weights of {name} were trained with QuickGELU but {name} "
                         f"builds GELU; {hint}")


def _mismatch(path: str, name: str) -> str | None:
    """Why the weights file `path` does not fit architecture `name` (first missing, misshapen or extra tensor);
    None when every tensor fits."""
    from .patching import PatchError, TensorSource
    try:
        source = TensorSource(path)
    except PatchError as e:
        return f"model.pretrained: cannot read {path}: {e}"
    expected = {k: tuple(v.shape) for k, v in open_clip.create_model(name, device="meta").state_dict().items()}
    for key, shape in expected.items():
        if key not in source:
            return f"model.pretrained: {path} does not hold weights of {name}: no tensor {key}"
        got = source.shape_dtype(key)[0]
        if got != shape and not (math.prod(got) == 1 and math.prod(shape) == 1):
            return (f"model.pretrained: {path} does not hold weights of {name}: {key} has shape {list(got)}, "
                    f"{name} expects {list(shape)}")
    extra = [k for k in source if k not in expected]
    if extra:
        return f"model.pretrained: {path} does not hold weights of {name}: unexpected tensor {extra[0]}"
    return None


def _diagnose(path: str, name: str, err: Exception) -> str:
    """One line saying why open_clip could not load `path` into architecture `name`."""
    return _mismatch(path, name) or (f"model.pretrained: cannot load {path} into {name}: {type(err).__name__}: "
                                     f"{str(err).splitlines()[0][:200]}")


def create(cfg: ModelConfig, device: str | torch.device = "cpu") -> tuple[nn.Module, Callable, Callable, Callable]:
    """Build (model, preprocess_train, preprocess_val, tokenizer); ModelError on any user mistake."""
    model_config(cfg.name)
    _check_pretrained(cfg.pretrained, cfg.name)
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            cfg.name, pretrained=cfg.pretrained or None, precision=cfg.precision_init, device=device)
    except Exception as e:  # a file of another model, a corrupt file, or a tag that cannot be downloaded
        if cfg.pretrained and os.path.isfile(cfg.pretrained):
            raise ModelError(_diagnose(cfg.pretrained, cfg.name, e)) from None
        if isinstance(e, RuntimeError) and "download" in str(e).lower():
            raise ModelError(f"model.pretrained: could not fetch {cfg.pretrained!r} for {cfg.name} (no model hub "
                             f"reachable?); download the weights elsewhere and pass a local file path") from None
        raise
    tokenizer = open_clip.get_tokenizer(cfg.name)
    return model, preprocess_train, preprocess_val, tokenizer


@contextmanager
def scalar_params_as_vectors() -> Iterator[None]:
    """While building a model, register 0-dim parameters (open_clip's logit_scale) with shape [1]: ZeRO-3's
    zero.Init partitions each module's parameters as soon as it is built and cannot handle 0-dim ones."""
    register = nn.Module.register_parameter

    def register_vector(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.dim() == 0:
            param = nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_vector
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def can_build_partitioned(cfg: ModelConfig) -> bool:
    """A local weights file: built under zero.Init and loaded tensor by tensor. Not a random init: open_clip's
    init code writes child modules' parameters after zero.Init has partitioned them, so a partitioned random init
    differs from the unpartitioned one (measured: 21 of clove-micro's tensors). Not a hub tag either: open_clip's
    own loader (OpenAI's TorchScript archives among them) needs the whole model."""
    return bool(cfg.pretrained) and os.path.isfile(cfg.pretrained)


def create_partitioned(cfg: ModelConfig, ds_config: dict[str, Any]) -> tuple[nn.Module, Callable, Callable, Callable,
                                                                                 dict[str, torch.Size]]:
    """ZeRO-3 start-up: no rank ever holds the whole model. Each module's parameters are partitioned as soon as it
    is built (deepspeed.zero.Init); pretrained weights are read from a memory-mapped file one tensor at a time
    (gathered, written by rank 0, partitioned again). Returns create()'s four values and the original shapes of
    parameters made [1] (see make_deepspeed_safe)."""
    import deepspeed
    from .patching import TensorSource
    model_config(cfg.name)
    _check_pretrained(cfg.pretrained, cfg.name)
    if cfg.pretrained:
        problem = _mismatch(cfg.pretrained, cfg.name)
        if problem:
            raise ModelError(problem)
    meta = open_clip.create_model(cfg.name, device="meta")
    original = {n: p.shape for n, p in meta.named_parameters() if p.dim() == 0}
    with scalar_params_as_vectors(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            cfg.name, pretrained=None, precision=cfg.precision_init)
    if cfg.pretrained:
        source = TensorSource(cfg.pretrained)
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                if rank0:
                    p.data.copy_(source[name].reshape(p.shape))
        for name, b in model.named_buffers():
            if name in source:
                b.data.copy_(source[name].reshape(b.shape))
    return model, preprocess_train, preprocess_val, open_clip.get_tokenizer(cfg.name), original


def make_deepspeed_safe(model: nn.Module) -> dict[str, torch.Size]:
    """Reshape 0-dim parameters to [1] in place (DeepSpeed views params as bytes); return the original shapes."""
    original: dict[str, torch.Size] = {}
    for name, p in list(model.named_parameters()):
        if p.dim() == 0:
            module_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(module_name) if module_name else model
            setattr(owner, attr, nn.Parameter(p.detach().reshape(1).clone(), requires_grad=p.requires_grad))
            original[name] = p.shape
    return original


def restore_shapes(state: dict[str, torch.Tensor], original: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Undo make_deepspeed_safe on a state dict (keys as in the unwrapped model)."""
    out = dict(state)
    for name, shape in original.items():
        if name in out:
            out[name] = out[name].reshape(shape)
    return out


def write_export_config(directory: str | os.PathLike, name: str) -> Path:
    path = Path(directory) / "open_clip_config.json"
    path.write_text(json.dumps({"model_cfg": model_config(name), "model_name": name}, indent=2))
    return path
