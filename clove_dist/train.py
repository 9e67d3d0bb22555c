"""CLoVe training: a DeepSpeed engine over an open_clip model, hard-negative contrastive loss, checkpoints, export.

    clove-dist train --config configs/debug.yaml --set optim.lr=1e-5          # one process, no launcher (CPU/GPU)
    torchrun --nproc_per_node 2 -m clove_dist.train --config configs/debug.yaml
    sbatch slurm/train.sh configs/clove_vit_b32.yaml                          # srun, one task per GPU

The run directory (run.output_dir/run.name) receives config.yaml (the resolved config), metrics.jsonl (one line per
log step: loss, lr, logit scale, samples/s, skipped samples), checkpoints/ (DeepSpeed's per-rank shards; `latest`
is replaced atomically after a complete save, so an interrupted save never hides the last good checkpoint), and at
the end export/: finetuned.safetensors and one patched_alpha<A>.safetensors per patching alpha, each loadable with
`open_clip.create_model(model.name, pretrained=path)`, plus open_clip_config.json for `local-dir:` loading.

Rerunning the same command resumes from the latest checkpoint (checkpoint.resume: auto).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from . import dist as cdist
from . import model as cmodel
from .config import Config, load_config, save_config
from .errors import UserError, entry_point
from .log import log, warn_once
from .loss import ContrastiveLoss


class TrainStep(nn.Module):
    """The module the engine wraps: encoders and loss in one forward, so ZeRO-3 gathers every parameter
    (logit_scale included) inside forward and nothing reads a partitioned parameter outside it."""

    def __init__(self, clip: nn.Module, loss_fn: ContrastiveLoss) -> None:
        super().__init__()
        self.clip = clip
        self.loss_fn = loss_fn

    def forward(self, images: torch.Tensor, texts: torch.Tensor, negatives: torch.Tensor,
                negative_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_features = self.clip.encode_image(images, normalize=True)  # (B, D)
        negatives = negatives[negative_valid]  # (n, L): only the real negatives of this rank
        all_texts = torch.cat([texts, negatives]) if negatives.numel() else texts
        text_features = self.clip.encode_text(all_texts, normalize=True)  # (B + n, D)
        num_pos = texts.shape[0]
        neg_features = text_features[num_pos:] if negatives.numel() else None
        loss = self.loss_fn(image_features.float(), text_features[:num_pos].float(), self.clip.logit_scale,
                            negative_features=None if neg_features is None else neg_features.float())
        return loss, self.clip.logit_scale.detach().float().exp().reshape(())


def param_groups(clip: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay weight matrices only; never biases, norms, embeddings of rank < 2 or logit_scale."""
    decay, no_decay = [], []
    for name, p in clip.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bias" in name or ".ln" in name or name.startswith("ln") or "norm" in name \
            or "logit_scale" in name or "logit_bias" in name
        (no_decay if exclude else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(warmup: int, total: int, schedule: str, min_ratio: float):
    """Multiplier of the peak lr at a step: linear warm-up, then cosine to min_ratio (or constant)."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def deepspeed_config(cfg: Config, device: torch.device) -> dict[str, Any]:
    precision = cfg.distributed.precision
    if device.type == "cpu" and precision != "fp32":
        warn_once(f"distributed.precision={precision} on CPU: training in fp32 instead")
        precision = "fp32"
    zero: dict[str, Any] = {"stage": cfg.distributed.zero_stage}
    if cfg.distributed.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False, stage3_param_persistence_threshold=10_000)
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**12,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }


def compute_dtype(ds_cfg: dict[str, Any]) -> torch.dtype:
    if ds_cfg["bf16"]["enabled"]:
        return torch.bfloat16
    if ds_cfg["fp16"]["enabled"]:
        return torch.float16
    return torch.float32


def clamp_logit_scale(param: nn.Parameter, max_logit_scale: float) -> None:
    """Clamp the master copy of logit_scale (a clamp of p.data alone is undone by ZeRO's fp32 master weights)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
    ceiling = math.log(max_logit_scale)
    if _zero_managed(param):
        value = safe_get_full_fp32_param(param)  # collective under ZeRO-3: every rank calls it
        if value is not None and float(value.max()) > ceiling:
            safe_set_full_fp32_param(param, value.clamp(max=ceiling))
    else:
        with torch.no_grad():
            param.clamp_(max=ceiling)


def _zero_managed(p: nn.Parameter) -> bool:
    """Whether ZeRO (ds_id, stage 3) or a DeepSpeed optimizer (_hp_mapping) holds this parameter's master copy."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def full_state_dict(clip: nn.Module, original_shapes: dict[str, torch.Size], keep: bool) -> dict[str, torch.Tensor]:
    """fp32 weights of every parameter, gathered from the ZeRO partitions: every rank takes part in the gather,
    only the rank with keep=True (rank 0) keeps a CPU copy."""
    from deepspeed.utils import safe_get_full_fp32_param
    state: dict[str, torch.Tensor] = {}
    for name, p in clip.named_parameters():
        value = safe_get_full_fp32_param(p) if _zero_managed(p) else None
        if keep:
            state[name] = (p.detach() if value is None else value).float().cpu().clone()
    if not keep:
        return {}
    for name, b in clip.named_buffers():
        module_name, _, attr = name.rpartition(".")
        owner = clip.get_submodule(module_name) if module_name else clip
        if attr not in owner._non_persistent_buffers_set:
            state[name] = b.detach().cpu().clone()
    return cmodel.restore_shapes(state, original_shapes)


@dataclass
class Checkpointer:
    directory: Path
    keep_last: int

    def latest(self) -> str | None:
        f = self.directory / "latest"
        if not f.is_file():
            return None
        tag = f.read_text().strip()
        return tag if tag and (self.directory / tag).is_dir() else None

    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> None:
        tag = f"step{step:09d}"
        engine.save_checkpoint(str(self.directory), tag=tag, client_state=client_state, save_latest=False)
        cdist.barrier()  # every rank's shard is on disk before `latest` moves
        if cdist.dist.get_rank() == 0:
            tmp = self.directory / "latest.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.directory / "latest")
            tags = sorted(p.name for p in self.directory.glob("step*") if p.is_dir())
            for old in tags[: max(0, len(tags) - self.keep_last)]:
                if old != tag:
                    shutil.rmtree(self.directory / old, ignore_errors=True)
        cdist.barrier()


def resume_dir(cfg: Config, ckpt: Checkpointer) -> tuple[Path, str] | None:
    mode = cfg.checkpoint.resume
    if mode == "none":
        if ckpt.latest():
            raise UserError(f"checkpoint.resume: none, but {ckpt.directory} already holds checkpoints of an earlier "
                            f"run; choose another run.name or output_dir, or resume (checkpoint.resume: auto)")
        return None
    if mode == "auto":
        tag = ckpt.latest()
        return (ckpt.directory, tag) if tag else None
    path = Path(mode)
    if not path.is_dir():
        raise UserError(f"checkpoint.resume: {mode} is not a checkpoint directory")
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    return path.parent, path.name


def export(cfg: Config, run_dir: Path, state: dict[str, torch.Tensor]) -> list[Path]:
    """Write finetuned + patched safetensors (rank 0 only); returns the written paths."""
    from .patching import interpolate_state, patched_name, save_state
    out = run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    written = [save_state(state, out / "finetuned.safetensors", {"model": cfg.model.name})]
    cmodel.write_export_config(out, cfg.model.name)
    if cfg.patching.alphas:
        torch.manual_seed(cfg.run.seed)  # with no pretrained weights: the same random init training started from
        base, *_ = cmodel.create(cfg.model)  # the weights training started from (tag or local file)
        pre = {k: v.float() for k, v in base.state_dict().items()}
        for alpha in cfg.patching.alphas:
            patched = interpolate_state(pre, state, alpha)
            written.append(save_state(patched, out / patched_name(alpha),
                                      {"model": cfg.model.name, "alpha": str(alpha)}))
    return written


def write_run_config(cfg: Config, run_dir: Path, resumed_tag: str | None) -> None:
    """config.yaml for a new run; a resumed run whose config changed keeps the old one and adds config.<tag>.yaml."""
    path = run_dir / "config.yaml"
    if resumed_tag and path.is_file():
        previous = path.read_text()
        save_config(cfg, run_dir / "config.tmp.yaml")
        current = (run_dir / "config.tmp.yaml").read_text()
        if current == previous:
            (run_dir / "config.tmp.yaml").unlink()
        else:
            os.replace(run_dir / "config.tmp.yaml", run_dir / f"config.{resumed_tag}.yaml")
        return
    save_config(cfg, path)


def _move(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return (batch["images"].to(device, dtype, non_blocking=True), batch["texts"].to(device, non_blocking=True),
            batch["negatives"].to(device, non_blocking=True), batch["negative_valid"].to(device, non_blocking=True))


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) training as configured; returns a summary (steps, last loss, export paths) on every rank."""
    env = cdist.setup(cfg.run.device, cfg.distributed.backend)
    import deepspeed  # after setup(): DS_ACCELERATOR must be set before DeepSpeed picks its accelerator
    # DeepSpeed 0.19 calls collectives that torch 2.14 deprecates, once per call: say it once, not every step.
    warnings.filterwarnings("once", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    from .data.pipeline import build_loader, expand_shards

    expand_shards(cfg.data.train_shards)  # user mistakes surface before anything is written
    torch.manual_seed(cfg.run.seed)
    clip, preprocess_train, _, tokenizer = cmodel.create(cfg.model)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint.keep_last)
    found = cdist.from_rank0(lambda: resume_dir(cfg, ckpt))  # every rank acts on rank 0's reading of the disk
    log(f"{env.launcher}: {env.world_size} rank(s) on {env.device}; run directory {run_dir}")
    original_shapes = cmodel.make_deepspeed_safe(clip)
    step_module = TrainStep(clip, ContrastiveLoss(cfg.loss.impl, cfg.loss.max_logit_scale, cfg.loss.chunk_size))
    global_batch = cfg.data.batch_size * env.world_size
    total_steps = math.ceil(cfg.train.total_samples / global_batch)
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    optimizer = torch.optim.AdamW(param_groups(clip, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.optim.warmup_steps, total_steps, cfg.optim.schedule, cfg.optim.min_lr_ratio))
    ds_cfg = deepspeed_config(cfg, env.device)
    dtype = compute_dtype(ds_cfg)
    engine, _, _, _ = deepspeed.initialize(model=step_module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_cfg, dist_init_required=False)

    step, samples_seen, skipped = 0, 0, {}
    if found:
        where = found[0] / found[1]
        try:
            load_path, client = engine.load_checkpoint(str(found[0]), tag=found[1])
            step, samples_seen = client["step"], client["samples_seen"]
        except (RuntimeError, KeyError, TypeError) as e:
            raise UserError(f"checkpoint {where} cannot resume this run ({cfg.model.name}): "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
        if load_path is None:
            raise UserError(f"checkpoint {where} could not be loaded")
        # the counts saved are already summed over ranks: rank 0 carries them on, the others start at zero
        skipped = dict(client.get("skipped", {})) if env.is_main else {}
        log(f"resumed from {load_path} at step {step}")
    if env.is_main:
        ckpt.directory.mkdir(parents=True, exist_ok=True)
        write_run_config(cfg, run_dir, found[1] if found else None)

    # The shard stream of a resumed run is seeded by where it resumes: resampled draws and one-pass shard orders
    # differ from the first run's (a one-pass epoch cut by the resume is not finished).
    loader = build_loader(cfg.data, cfg.negatives, preprocess_train, tokenizer,
                          seed=cfg.run.seed * 1_000_003 + step, epoch=step)
    metrics_path = run_dir / "metrics.jsonl"
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not env.is_main, dynamic_ncols=True)
    loss_value = float("nan")
    saved_step = step if found else -1
    window_t, window_samples = time.perf_counter(), 0
    batches_from_loader = 0
    batches = iter(loader)
    while step < total_steps:
        try:
            batch = next(batches)
        except StopIteration:  # one-pass mode: start the next epoch
            if batches_from_loader == 0:
                raise UserError(f"data.train_shards gave rank {env.rank} no full batch of {cfg.data.batch_size} "
                                f"(one pass over the shards, {env.world_size} rank(s), {cfg.data.num_workers} "
                                f"worker(s) each): too few samples or shards, or every sample skipped") from None
            loader = build_loader(cfg.data, cfg.negatives, preprocess_train, tokenizer,
                                  seed=cfg.run.seed * 1_000_003 + step, epoch=step)
            batches, batches_from_loader = iter(loader), 0
            continue
        batches_from_loader += 1
        for k, v in batch["stats"].items():
            skipped[k] = skipped.get(k, 0) + v
        lr = engine.get_lr()[0]  # the rate this step uses; engine.step() advances the schedule
        loss, scale = engine(*_move(batch, env.device, dtype))
        engine.backward(loss)
        engine.step()
        clamp_logit_scale(clip.logit_scale, cfg.loss.max_logit_scale)
        step += 1
        samples_seen += batch["num_samples"] * env.world_size
        window_samples += batch["num_samples"] * env.world_size
        bar.update(1)
        if step % cfg.run.log_every == 0 or step == total_steps:
            loss_value, num_negs = cdist.all_sum([float(loss.detach()), float(batch["negative_valid"].sum())],
                                                 env.device)
            loss_value /= env.world_size
            counts = cdist.merge_counts(skipped)
            now = time.perf_counter()
            record = {"step": step, "samples": samples_seen, "loss": loss_value,
                      "lr": lr, "logit_scale": float(scale),
                      "samples_per_s": window_samples / max(now - window_t, 1e-9), "negatives": int(num_negs),
                      **{k: int(v) for k, v in counts.items()}}
            window_t, window_samples = now, 0
            if env.is_main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{loss_value:.4f}", scale=f"{float(scale):.1f}")
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < total_steps:
            ckpt.save(engine, step, {"step": step, "samples_seen": samples_seen,
                                     "skipped": cdist.merge_counts(skipped)})
            saved_step = step
    bar.close()
    if saved_step != step:
        ckpt.save(engine, step, {"step": step, "samples_seen": samples_seen, "skipped": cdist.merge_counts(skipped)})

    written: list[Path] = []
    if cfg.patching.export:
        state = full_state_dict(clip, original_shapes, keep=env.is_main)
        if env.is_main:
            written = export(cfg, run_dir, state)
            log("exported: " + ", ".join(str(p) for p in written))
    # Only rank 0 evaluates; the other ranks leave rather than wait in a collective that could time out.
    if env.is_main and written and (cfg.eval.sugarcrepe_dir or cfg.eval.zeroshot_dir):
        evaluate_exports(cfg, run_dir, written, env.device)
    return {"steps": step, "samples": samples_seen, "loss": loss_value, "run_dir": str(run_dir),
            "exports": [str(p) for p in written], "skipped": skipped}


def evaluate_exports(cfg: Config, run_dir: Path, exports: list[Path], device: torch.device) -> Path:
    """Evaluate every exported model on the configured sets; results in run_dir/eval.json (rank 0 only)."""
    from .config import ModelConfig
    from .eval import evaluate_all
    results = {}
    for path in exports:
        clip, _, preprocess, tokenizer = cmodel.create(ModelConfig(name=cfg.model.name, pretrained=str(path)), device)
        results[path.name] = evaluate_all(clip, preprocess, tokenizer, sugarcrepe_dir=cfg.eval.sugarcrepe_dir,
                                          zeroshot_dir=cfg.eval.zeroshot_dir, device=device,
                                          batch_size=cfg.eval.batch_size)
        sc, zs = results[path.name].get("sugarcrepe", {}), results[path.name].get("zeroshot", {})
        log(f"eval {path.name}: SugarCrepe average {sc.get('average')}, zero-shot top-1 {zs.get('top1')}")
    out = run_dir / "eval.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    return out


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="clove-dist train", description="Train CLoVe (see the module docstring).")
    ap.add_argument("--config", help="YAML config file (default: all defaults)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set optim.lr=1e-5 (repeatable)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    log(f"done: {summary['steps']} steps, final loss {summary['loss']:.4f}, run directory {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
