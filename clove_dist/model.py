"""The open_clip model factory: architecture by name, weights from an open_clip tag or a local file.

    model, preprocess_train, preprocess_val, tokenizer = create(ModelConfig(name="ViT-B-32", pretrained="openai"))
    model, ... = create(ModelConfig(name="clove-tiny", pretrained="runs/base/export/finetuned.safetensors"))

Besides open_clip's own architectures, the small configs in clove_dist/model_configs/ (clove-tiny, clove-micro) are
registered with open_clip at import, so `open_clip.create_model("clove-tiny", pretrained=path)` works once this
module is imported. No model hub is needed when `pretrained` is a local path.

DeepSpeed cannot handle 0-dim parameters (open_clip's logit_scale): `make_deepspeed_safe` turns them into shape
[1] before the engine is built, and `restore_shapes` puts the original shapes back on export.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from torch import nn

from .config import ModelConfig
from .errors import UserError

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
TINY_CONFIGS = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
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


def _describe_mismatch(err: RuntimeError, path: str, name: str) -> str:
    text = str(err)
    first = next((ln.strip() for ln in text.splitlines() if "size mismatch" in ln or "Missing key" in ln
                  or "Unexpected key" in ln), text.splitlines()[0] if text else "")
    return f"model.pretrained: {path} does not hold weights of {name}: {first[:300]}"


def create(cfg: ModelConfig, device: str | torch.device = "cpu") -> tuple[nn.Module, Callable, Callable, Callable]:
    """Build (model, preprocess_train, preprocess_val, tokenizer); ModelError on any user mistake."""
    model_config(cfg.name)
    _check_pretrained(cfg.pretrained, cfg.name)
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            cfg.name, pretrained=cfg.pretrained or None, precision=cfg.precision_init, device=device)
    except RuntimeError as e:
        if cfg.pretrained and os.path.isfile(cfg.pretrained):
            raise ModelError(_describe_mismatch(e, cfg.pretrained, cfg.name)) from None
        if "download" in str(e).lower():
            raise ModelError(f"model.pretrained: could not fetch {cfg.pretrained!r} for {cfg.name} (no model hub "
                             f"reachable?); download the weights elsewhere and pass a local file path") from None
        raise
    except Exception as e:  # unreadable file: safetensors / pickle errors of many kinds
        if cfg.pretrained and os.path.isfile(cfg.pretrained):
            raise ModelError(f"model.pretrained: cannot read {cfg.pretrained}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
        raise
    tokenizer = open_clip.get_tokenizer(cfg.name)
    return model, preprocess_train, preprocess_val, tokenizer


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


def scalar_param_shapes(name: str) -> dict[str, torch.Size]:
    """Shapes open_clip's architecture `name` gives its scalar parameters (logit_scale, logit_bias)."""
    cfg = model_config(name)
    shape = torch.Size([1]) if cfg.get("nonscalar_logit_scale") else torch.Size([])
    shapes = {"logit_scale": shape}
    if cfg.get("init_logit_bias") is not None:
        shapes["logit_bias"] = shape
    return shapes


def write_export_config(directory: str | os.PathLike, name: str) -> Path:
    path = Path(directory) / "open_clip_config.json"
    path.write_text(json.dumps({"model_cfg": model_config(name), "model_name": name}, indent=2))
    return path
