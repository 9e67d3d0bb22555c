"""What the trainer needs from DeepSpeed's ZeRO: the engine config, and the fp32 master copy of a parameter.

    ds_cfg = deepspeed_config(cfg.distributed, cfg.data.batch_size, cfg.optim.grad_clip)
    clamp_logit_scale(engine, clip.logit_scale, max_logit_scale=100.0)     # after engine.step(), on every rank

Where the fp32 master value of a parameter lives, by engine mode (each rank sees only its own piece):

| mode                       | master copy                                    | this rank's piece                      |
|----------------------------|------------------------------------------------|----------------------------------------|
| ZeRO-3                     | the optimizer's fp32 partition (`ds_id`)       | `safe_get_local_fp32_param` (may be [])|
| ZeRO-1/2                   | the optimizer's flat fp32 partition            | `p._hp_mapping.hp_fragment` (may be [])|
| ZeRO-0, bf16/fp16          | FP16_(Unfused)Optimizer's fp32 groups          | the whole tensor                       |
| ZeRO-0, fp32               | the parameter itself                           | the whole tensor                       |

Writing `p.data` alone is undone at the next step in every mode but the last (the master copy wins), and a full
get/set (`safe_set_full_fp32_param`) is a collective that fails for a 1-element parameter under ZeRO-3 on rank >= 1:
so a clamp edits each rank's own piece of the master copy, with no collective, plus the low-precision copy.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import DistributedConfig
from .log import warn_once

DTYPE_NAMES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def deepspeed_config(dcfg: DistributedConfig, micro_batch: int, grad_clip: float,
                     device: torch.device) -> dict[str, Any]:
    """The DeepSpeed JSON config of a run, from the `distributed` section."""
    precision = dcfg.precision
    if device.type == "cpu" and precision == "fp16":
        warn_once("distributed.precision=fp16 on CPU: training in fp32 instead (no fp16 kernels on CPU)")
        precision = "fp32"
    zero: dict[str, Any] = {"stage": dcfg.zero_stage, "reduce_bucket_size": dcfg.reduce_bucket_size}
    if dcfg.overlap_comm != "auto":
        zero["overlap_comm"] = dcfg.overlap_comm == "true"
    if dcfg.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False,
                    stage3_param_persistence_threshold=dcfg.stage3_param_persistence_threshold)
    reduce_dtype = precision if dcfg.grad_reduce_dtype == "auto" else dcfg.grad_reduce_dtype
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**12,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "gradient_clipping": grad_clip,
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
    if precision != "fp32":
        # bf16 gradients summed over hundreds of ranks lose most of their mantissa: reduce in fp32 by default.
        cfg["communication_data_type"] = DTYPE_NAMES[reduce_dtype]
    return cfg


def compute_dtype(ds_cfg: dict[str, Any]) -> torch.dtype:
    if ds_cfg["bf16"]["enabled"]:
        return torch.bfloat16
    if ds_cfg["fp16"]["enabled"]:
        return torch.float16
    return torch.float32


def zero0_masters(engine: Any) -> dict[int, torch.Tensor]:
    """id(param) -> the fp32 copy FP16_Optimizer / FP16_UnfusedOptimizer keep of it (ZeRO-0 with bf16/fp16);
    empty in every other mode."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    opt = getattr(engine, "optimizer", None)
    masters: dict[int, torch.Tensor] = {}
    if not isinstance(opt, (FP16_Optimizer, FP16_UnfusedOptimizer)):  # ZeRO optimizers name groups alike
        return masters
    lp_groups = opt.fp16_groups
    for i, group in enumerate(lp_groups):
        offset = 0
        for j, p in enumerate(group):
            if hasattr(opt, "fp32_groups"):
                masters[id(p)] = opt.fp32_groups[i][j]
            else:  # fused: one flat fp32 tensor per group, params back to back
                masters[id(p)] = opt.fp32_groups_flat[i].narrow(0, offset, p.numel()).view(p.shape)
            offset += p.numel()
    return masters


def _zero0_master(engine: Any, param: nn.Parameter) -> torch.Tensor | None:
    return zero0_masters(engine).get(id(param))


def local_master(engine: Any, param: nn.Parameter) -> tuple[torch.Tensor, Any]:
    """(this rank's piece of param's fp32 master copy, a writer that stores a new value of that piece).

    The piece is a flat or shaped fp32 tensor, possibly empty (ZeRO partitions of other ranks)."""
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param
        piece = safe_get_local_fp32_param(param)
        return piece, lambda value: safe_set_local_fp32_param(param, value)
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is not None:
        piece = mapping.hp_fragment
        return piece, lambda value: piece.data.copy_(value)
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2 parameter none of whose elements this rank owns
        empty = torch.empty(0, dtype=torch.float32, device=param.device)
        return empty, lambda value: None
    master = _zero0_master(engine, param)
    if master is not None:
        return master, lambda value: master.data.copy_(value)
    return param.data, lambda value: param.data.copy_(value)


@torch.no_grad()
def clamp_logit_scale(engine: Any, param: nn.Parameter, max_logit_scale: float) -> None:
    """Clamp logit_scale to log(max_logit_scale) in its fp32 master copy and in the working copy; local, no
    collective (every rank clamps the piece it owns)."""
    ceiling = math.log(max_logit_scale)
    piece, store = local_master(engine, param)
    if piece.numel() and bool((piece > ceiling).any()):
        store(piece.clamp(max=ceiling))
    if param.data.numel():  # under ZeRO-3 the working copy is an empty placeholder outside forward
        param.data.clamp_(max=ceiling)


def full_fp32_state(engine: Any, model: nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """fp32 master weights of every parameter (plus persistent buffers), gathered whole. Collective under ZeRO:
    every rank takes part, only the rank with keep=True holds the CPU copy."""
    from deepspeed.utils import safe_get_full_fp32_param
    state: dict[str, torch.Tensor] = {}
    masters = zero0_masters(engine)  # once, not once per parameter
    for name, p in model.named_parameters():
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            value = safe_get_full_fp32_param(p)
        else:
            value = masters.get(id(p), p.detach())
        if keep:
            state[name] = value.float().cpu().clone()
    if keep:
        for name, b in model.named_buffers():
            module_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(module_name) if module_name else model
            if attr not in owner._non_persistent_buffers_set:
                state[name] = b.detach().cpu().clone()
    return state
