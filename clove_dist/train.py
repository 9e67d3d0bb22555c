"""CLoVe training: a DeepSpeed engine over an open_clip model, hard-negative contrastive loss, checkpoints, export.

    clove-dist train --config configs/debug.yaml --set optim.lr=1e-5          # one process, no launcher (CPU/GPU)
    torchrun --nproc_per_node 2 -m clove_dist.train --config configs/debug.yaml
    sbatch --nodes 1 --ntasks-per-node 8 --gpus-per-node 8 slurm/train.sh configs/clove_vit_b32.yaml  # one task a GPU

The run directory (run.output_dir/run.name) receives config.yaml (the resolved config), metrics.jsonl (one line per
log step: loss, lr, logit scale, samples/s, skipped samples; plus `{"event": "preempted" | "resumed", "step": S}`
lines), checkpoints/ (see clove_dist/checkpoint.py: a manifest marks a complete one, `latest` moves atomically), and
at the end export/: finetuned.safetensors and one patched_alpha<A>.safetensors per patching alpha, each loadable with
`open_clip.create_model(model.name, pretrained=path)`, plus open_clip_config.json for `local-dir:` loading.
Rank 0 holds run.lock (clove_dist/run_lock.py) while the run lives: a second run on the same directory is refused.

Rerunning the same command resumes from the latest complete checkpoint (checkpoint.resume: auto), on the same or on
another number of ranks; a finished run says so and exits. SIGUSR1 or SIGTERM make every rank save at the next step
and exit with status 75 (slurm/train.sh requeues the job then).

The Trainer's phases: build (environment, model, engine, resume, data), step, log, checkpoint, finish (export,
evaluation). Each component is built from its own config section.
"""
from __future__ import annotations

if __name__ == "__main__":  # started as a program (srun, torchrun): record stop signals before the slow imports
    from clove_dist.preemption import Preemption as _Preemption
    _Preemption.install()

import argparse
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from . import checkpoint as cckpt
from . import dist as cdist
from . import model as cmodel
from . import zero
from .config import Config, load_config, save_config, to_dict
from .eval.in_training import TrainingEvaluator
from .errors import UserError, entry_point
from .log import log
from .loss import ContrastiveLoss
from .preemption import PREEMPTED_EXIT, Preemption, requeue_slurm_job
from .patching import export_sharded
from .reporting import build_reporters, hard_negative_stats, neg_metrics
from .run_lock import RunLock

UNIVERSAL_CHECKPOINT_VERSION = 0.4  # deepspeed.checkpoint.constants.UNIVERSAL_CHECKPOINT_VERSION_VALUE (0.19)


class TrainStep(nn.Module):
    """The module the engine wraps: encoders and loss in one forward, so ZeRO-3 gathers every parameter
    (logit_scale included) inside forward and nothing reads a partitioned parameter outside it.

    Features reach the loss in the encoders' dtype (bf16 under bf16 training: tensor-core dots in the loss kernel).
    Every rank passes its negatives, possibly none ([0, D]), so every rank issues the same collectives."""

    def __init__(self, clip: nn.Module, loss_fn: ContrastiveLoss) -> None:
        super().__init__()
        self.clip = clip
        self.loss_fn = loss_fn

    def forward(self, images: torch.Tensor, texts: torch.Tensor, negatives: torch.Tensor,
                negative_valid: torch.Tensor, negative_owner: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Returns the loss, the scale used, and this rank's watch statistics (a float64 tensor [5]: images with a
        negative, those whose caption won, margin sum, image->text loss, text->image loss), read only at log steps."""
        image_features = self.clip.encode_image(images, normalize=True)  # (B, D)
        negatives = negatives[negative_valid]  # (n, L): only the real negatives of this rank, n may be 0
        text_features = self.clip.encode_text(torch.cat([texts, negatives]), normalize=True)  # (B + n, D)
        num_pos = texts.shape[0]
        loss = self.loss_fn(image_features, text_features[:num_pos], self.clip.logit_scale,
                            negative_features=text_features[num_pos:])
        # the scale the loss used: exp(logit_scale) clamped (a value above the ceiling is cut back after the step)
        scale = self.clip.logit_scale.detach().float().exp().clamp(max=self.loss_fn.max_logit_scale).reshape(())
        directions = self.loss_fn.last_directions
        watch = torch.cat([hard_negative_stats(image_features, text_features[:num_pos], text_features[num_pos:],
                                               negative_owner[negative_valid]),
                           torch.stack([directions["i2t"], directions["t2i"]]).double()])
        return loss, scale, watch


def param_groups(clip: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay weight matrices only; never biases, norms, embeddings of rank < 2 or logit_scale."""
    decay, no_decay = [], []
    for name, p in clip.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partitioned parameter's own shape is [0]
        exclude = ndim < 2 or "bias" in name or ".ln" in name or name.startswith("ln") or "norm" in name \
            or "logit_scale" in name or "logit_bias" in name
        (no_decay if exclude else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # DeepSpeed drops empty groups; the lr schedule must see the same


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


def config_file_for(run_dir: Path, tag: str, *, resumed_from: bool = False) -> Path:
    """The config a run had when it wrote checkpoint `tag` (resumed_from: when it went on from `tag`):
    config.yaml, or the newest config.<S>.yaml a resume from S wrote, with S < tag (S <= tag)."""
    def in_effect(p: Path) -> bool:
        s = p.name[len("config."):-len(".yaml")]
        return s < tag or (resumed_from and s == tag)
    changed = sorted(p for p in run_dir.glob("config.step*.yaml") if in_effect(p))
    return changed[-1] if changed else run_dir / "config.yaml"


def write_run_config(cfg: Config, run_dir: Path, resumed_tag: str | None) -> None:
    """config.yaml for a new run; a resumed run whose config differs from the one in effect at its checkpoint keeps
    the old files and adds config.<tag>.yaml (a return to an earlier config is a change too)."""
    path = run_dir / "config.yaml"
    if resumed_tag and path.is_file():
        previous = config_file_for(run_dir, resumed_tag, resumed_from=True).read_text()
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
            batch["negatives"].to(device, non_blocking=True), batch["negative_valid"].to(device, non_blocking=True),
            batch["negative_owner"].to(device, non_blocking=True))


class Preempted(Exception):
    """Raised out of the loop after the preemption checkpoint is on disk."""


class Trainer:
    """One training run, in phases: build, then step/log/checkpoint in a loop, then finish."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.step = 0
        self.global_batch = self.schedule_batch = 1
        self.samples_seen = 0
        self.skipped: dict[str, int] = {}
        self.epoch = 0  # one-pass mode: this rank's pass over the shards
        self.loss_value = float("nan")
        self.saved_step = -1
        self.preemption: Preemption | None = None
        self.lock: RunLock | None = None

    # -- build -------------------------------------------------------------------------------------------------
    def build(self) -> None:
        from .data.pipeline import expand_shards
        cfg = self.cfg
        expand_shards(cfg.data.train_shards)  # user mistakes surface before anything is written
        cdist.setup(cfg.run.device, cfg.distributed.backend, cfg.distributed.timeout_minutes)

        def take_lock() -> None:  # rank 0, before anything in the run directory is read or written
            self.lock = RunLock.acquire(Path(cfg.run.output_dir) / cfg.run.name)
        cdist.from_rank0(take_lock)  # every rank raises when another run holds the directory
        self.build_engine()
        env = self.env
        # Counted from the samples still to draw, so a run resumed on another number of ranks draws
        # train.total_samples in all, not that many steps of another size.
        remaining = max(0, cfg.train.total_samples - self.samples_seen)
        self.total_steps = self.step + math.ceil(remaining / self.global_batch)
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        if env.is_main:
            self.ckpt.directory.mkdir(parents=True, exist_ok=True)
            write_run_config(cfg, self.run_dir, self.found[1] if self.found else None)
        if env.is_main:  # also a run killed before its first checkpoint starts the file anew
            dropped = cckpt.truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            if dropped:
                log(f"dropped {dropped} metric line(s) logged after the checkpoint of step {self.step}")
        self.reporter = build_reporters(cfg.run, self.run_dir, is_main=env.is_main, config=to_dict(cfg))
        if self.found:
            self.reporter.event("resumed", self.step, checkpoint=self.found[1], world_size=env.world_size)
        self.evaluator = TrainingEvaluator(cfg.eval, cfg.model.name, self.run_dir, env.device, seed=cfg.run.seed)
        self.evaluator.forget_after(self.step, env.is_main)
        self._build_loader()

    def build_engine(self) -> None:
        """The model and its DeepSpeed engine, loaded from the checkpoint checkpoint.resume finds; writes nothing
        but a universal conversion when the checkpoint is of another world size."""
        cfg = self.cfg
        self.env = cdist.setup(cfg.run.device, cfg.distributed.backend, cfg.distributed.timeout_minutes)
        import deepspeed  # after setup(): DS_ACCELERATOR must be set before DeepSpeed picks its accelerator
        # DeepSpeed 0.19 calls collectives that torch 2.14 deprecates, once per call: say it once, not every step.
        warnings.filterwarnings("once", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        self.ckpt = cckpt.Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint.keep_last)
        self.found = cdist.from_rank0(lambda: self.ckpt.find(cfg.checkpoint.resume))  # one reading of the disk
        env = self.env
        log(f"{env.launcher}: {env.world_size} rank(s) on {env.device}; run directory {self.run_dir}")
        self.global_batch = cfg.data.batch_size * env.world_size
        self.schedule_batch = self.global_batch  # the global batch the lr schedule counts steps in (see _lr)

        ds_cfg = zero.deepspeed_config(cfg.distributed, cfg.data.batch_size, cfg.optim.grad_clip, env.device)
        torch.manual_seed(cfg.run.seed)
        if cfg.distributed.zero_stage == 3 and cmodel.can_build_partitioned(cfg.model):
            self.clip, self.preprocess, _, self.tokenizer, self.original_shapes = \
                cmodel.create_partitioned(cfg.model, ds_cfg)
        else:
            self.clip, self.preprocess, _, self.tokenizer = cmodel.create(cfg.model)
            self.original_shapes = cmodel.make_deepspeed_safe(self.clip)
        # Augmentations draw from the global generator: seed it again so that they do not depend on how much
        # randomness building the model took (a partitioned build takes another amount than a whole one).
        torch.manual_seed(cfg.run.seed + 1)
        step_module = TrainStep(self.clip, ContrastiveLoss.from_config(cfg.loss))
        optimizer = torch.optim.AdamW(param_groups(self.clip, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                      betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr)
        load_tag = self._resume_tag(ds_cfg)
        self.dtype = zero.compute_dtype(ds_cfg)
        self.engine, _, _, _ = deepspeed.initialize(model=step_module, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_cfg, dist_init_required=False)
        if self.found:
            self._load(load_tag)

    def _lr(self, _step: int) -> float:
        """Multiplier of the peak lr for the next step, by samples drawn so far: the schedule's steps are of the
        global batch the run started with, so resuming on another number of ranks continues the same curve."""
        o, t = self.cfg.optim, self.cfg.train
        schedule_steps = math.ceil(t.total_samples / self.schedule_batch)
        if t.max_steps:
            schedule_steps = min(schedule_steps, t.max_steps)
        return lr_lambda(o.warmup_steps, schedule_steps, o.schedule, o.min_lr_ratio)(
            self.samples_seen / self.schedule_batch)

    def _resume_tag(self, ds_cfg: dict[str, Any]) -> str | None:
        """The tag the engine loads; a checkpoint of another world size goes through the universal format."""
        if not self.found:
            return None
        directory, tag, manifest = self.found
        written_by = int(manifest.get("world_size", self.env.world_size))
        stage = manifest.get("zero_stage", self.cfg.distributed.zero_stage)
        if stage != self.cfg.distributed.zero_stage:
            raise cckpt.CheckpointError(f"checkpoint {directory / tag} was written with ZeRO stage {stage}; this run "
                                        f"has distributed.zero_stage={self.cfg.distributed.zero_stage}: resume with "
                                        f"stage {stage}, or start from its weights (clove-dist export, then "
                                        f"model.pretrained)")
        if written_by == self.env.world_size or manifest.get("zero_stage") == 0:  # ZeRO-0 saves whole states
            return tag
        log(f"checkpoint {directory / tag} was written by {written_by} rank(s); resuming on {self.env.world_size}")
        # rank 0 converts while the others wait on the store: a large model's conversion can outlast the timeout
        universal = cdist.from_rank0_long(lambda: cckpt.to_universal(directory, tag))
        ds_cfg["checkpoint"] = {"load_universal": True}
        return universal

    def _load(self, tag: str | None) -> None:
        directory, found_tag, _ = self.found
        where = directory / found_tag
        try:
            load_path, client = self.engine.load_checkpoint(str(directory), tag=tag)
            self.step, self.samples_seen = client["step"], client["samples_seen"]
        except (RuntimeError, KeyError, TypeError, ValueError, AssertionError, OSError) as e:
            raise UserError(f"checkpoint {where} cannot resume this run ({self.cfg.model.name}): "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None
        if load_path is None:
            raise UserError(f"checkpoint {where} could not be loaded")
        # the counts saved are already summed over ranks: rank 0 carries them on, the others start at zero
        self.skipped = dict(client.get("skipped", {})) if self.env.is_main else {}
        self.schedule_batch = int(client.get("schedule_batch", self.global_batch))
        self.epoch = int(client.get("epoch", -1)) + 1  # a one-pass epoch cut by the checkpoint is not resumed
        self.saved_step = self.step
        log(f"resumed from {load_path} at step {self.step}")

    def _build_loader(self) -> None:
        from .data.pipeline import build_loader, stream_seed
        cfg = self.cfg
        seed, epoch = stream_seed(cfg.run.seed, cfg.data.resampled, self.step, self.epoch)
        loader = build_loader(cfg.data, cfg.negatives, self.preprocess, self.tokenizer, seed=seed, epoch=epoch)
        self.batches = iter(loader)
        self.batches_from_loader = 0

    # -- the loop ----------------------------------------------------------------------------------------------
    def next_batch(self) -> dict[str, Any] | None:
        """The next batch; None when a whole one-pass epoch gave this rank none (the step's agreement then stops
        every rank with one line, instead of this rank retrying while the others wait in a collective)."""
        while True:
            try:
                batch = next(self.batches)
            except StopIteration:  # one-pass mode: start this rank's next epoch
                self.epoch += 1
                empty = self.batches_from_loader == 0
                self._build_loader()
                if empty:
                    return None
                continue
            self.batches_from_loader += 1
            return batch

    def agree(self, batch: dict[str, Any] | None) -> str | None:
        """Collective, once per step: one MAX all-reduce of (stop signal, starved rank) so that every rank takes
        the same branch; returns the signal some rank received, or None."""
        signal_code = self.preemption.code if self.preemption is not None else 0
        code, starved = cdist.all_max_ints([signal_code, int(batch is None)], self.env.device)
        if starved:
            cfg, env = self.cfg, self.env
            raise UserError(f"data.train_shards gave a rank no full batch of {cfg.data.batch_size} (one pass over "
                            f"the shards, {env.world_size} rank(s), {cfg.data.num_workers} worker(s) each): too few "
                            f"samples or shards, or every sample skipped")
        return Preemption.name(code)

    def train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        for k, v in batch["stats"].items():
            self.skipped[k] = self.skipped.get(k, 0) + v
        loss, scale, self.watch = self.engine(*_move(batch, self.env.device, self.dtype))
        self.engine.backward(loss)
        self.samples_seen += batch["num_samples"] * self.env.world_size  # before step(): the lr schedule reads it
        self.engine.step()
        zero.clamp_logit_scale(self.engine, self.clip.logit_scale, self.cfg.loss.max_logit_scale)
        self.step += 1
        return loss, scale

    def log_step(self, loss: torch.Tensor, scale: torch.Tensor, batch: dict[str, Any], lr: float,
                 window: dict[str, float]) -> None:
        """One metrics line (see clove_dist.reporting.METRIC_NAMES), values reduced over ranks."""
        env = self.env
        sums = cdist.all_sum([float(loss.detach()), float(batch["negative_valid"].sum()), *self.watch.tolist()],
                             env.device)
        loss_value, num_negs, watch = sums[0], sums[1], sums[2:]
        self.loss_value = loss_value / env.world_size
        now = time.perf_counter()
        elapsed, steps = max(now - window["t"], 1e-9), max(window["steps"], 1)
        record = {"samples": self.samples_seen, "loss": self.loss_value, "loss_i2t": watch[3] / env.world_size,
                  "loss_t2i": watch[4] / env.world_size, **neg_metrics(watch[:3]), "lr": lr,
                  "logit_scale": float(scale),
                  "samples_per_s": window["samples"] / elapsed,
                  "samples_per_s_per_device": window["samples"] / elapsed / env.world_size,
                  "data_wait_s": window["wait"] / steps, "compute_s": window["compute"] / steps,
                  "negatives": int(num_negs), **{k: int(v) for k, v in cdist.merge_counts(self.skipped).items()}}
        window.update(t=now, samples=0, steps=0, wait=0.0, compute=0.0)
        self.reporter.log(self.step, record)
        if env.is_main:
            self.bar.set_postfix(loss=f"{self.loss_value:.4f}", scale=f"{float(scale):.1f}")

    def evaluate(self) -> None:
        """Evaluation during training (eval.every_steps): gathering the weights is a collective on every rank."""
        keep = self.env.is_main or self.cfg.eval.sharded
        state = zero.full_fp32_state(self.engine, self.clip, keep=keep)
        state = cmodel.restore_shapes(state, self.original_shapes) if keep else None
        try:
            self.evaluator.run(self.step, state, is_main=self.env.is_main, reporter=self.reporter)
        except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as e:  # EvaluationFailed too
            raise UserError(f"eval at step {self.step}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                            ) from None

    def save(self) -> None:
        self.ckpt.save(self.engine, self.step, {
            "step": self.step, "samples_seen": self.samples_seen, "skipped": cdist.merge_counts(self.skipped),
            "epoch": cdist.all_max_int(self.epoch, self.env.device), "world_size": self.env.world_size,
            "zero_stage": self.cfg.distributed.zero_stage, "model": self.cfg.model.name,
            "schedule_batch": self.schedule_batch,
            # what DeepSpeed's ds_to_universal needs to convert the checkpoint for another world size
            "universal_checkpoint_info": {"universal_checkpoint_version": UNIVERSAL_CHECKPOINT_VERSION}})
        self.saved_step = self.step

    def loop(self) -> None:
        cfg = self.cfg
        self.bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                        disable=not self.env.is_main, dynamic_ncols=True)
        window = {"t": time.perf_counter(), "samples": 0, "steps": 0, "wait": 0.0, "compute": 0.0}
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                batch = self.next_batch()
                t1 = time.perf_counter()
                signame = self.agree(batch)
                if signame:
                    log(f"preempted by {signame} at step {self.step}: saving a checkpoint")
                    if self.saved_step != self.step:
                        self.save()
                    self.reporter.event("preempted", self.step, signal=signame)
                    cdist.barrier()  # everything is on disk on every rank before any rank exits or requeues
                    raise Preempted(signame)
                lr = self.engine.get_lr()[0]  # the rate this step uses; engine.step() advances the schedule
                loss, scale = self.train_step(batch)
                window["wait"] += t1 - t0
                window["compute"] += time.perf_counter() - t1
                window["steps"] += 1
                window["samples"] += batch["num_samples"] * self.env.world_size
                self.bar.update(1)
                if self.step % cfg.run.log_every == 0 or self.step == self.total_steps:
                    self.log_step(loss, scale, batch, lr, window)
                if self.evaluator.due(self.step):
                    self.evaluate()
                if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0 \
                        and self.step < self.total_steps:
                    self.save()
        finally:
            self.bar.close()
        if self.saved_step != self.step:
            self.save()

    # -- finish ------------------------------------------------------------------------------------------------
    def finish(self) -> list[Path]:
        cfg, env = self.cfg, self.env
        written: list[Path] = []
        if cfg.patching.export:
            # every rank writes the byte ranges of the fp32 master values it owns: no rank holds a whole model
            written = export_sharded(self.clip, self.original_shapes, cfg.model.name, cfg.model.pretrained or None,
                                     cfg.patching.alphas, self.run_dir / "export", seed=cfg.run.seed,
                                     model_cfg=cfg.model, engine=self.engine)
            log("exported: " + ", ".join(str(p) for p in written))
        # Rank 0 evaluates the exports while the others wait on the store, not in a collective that could time
        # out; none leaves early (under srun --kill-on-bad-exit a rank that failed on its way out would take the
        # evaluation down with it). The condition is the same on every rank.
        e = cfg.eval
        if cfg.patching.export and (e.sugarcrepe_dir or e.zeroshot_dir or e.retrieval_dir or e.aro_dir):
            cdist.from_rank0_long(lambda: str(evaluate_exports(cfg, self.run_dir, written, env.device)))
        return written

    def is_complete(self) -> bool:
        """A resumed run whose last checkpoint is its final step and whose every export is on disk."""
        from .patching import patched_name
        export = self.run_dir / "export"
        names = ["finetuned.safetensors"] + [patched_name(a) for a in self.cfg.patching.alphas]
        exported = not self.cfg.patching.export or all((export / n).is_file() for n in names)
        return bool(self.found) and self.step >= self.total_steps and exported

    def summary(self, written: list[Path], **extra: Any) -> dict[str, Any]:
        return {"steps": self.step, "samples": self.samples_seen, "loss": self.loss_value,
                "run_dir": str(self.run_dir), "exports": [str(p) for p in written], "skipped": self.skipped, **extra}


def train(cfg: Config, handle_signals: bool = False) -> dict[str, Any]:
    """Run (or resume) training as configured; returns a summary (steps, last loss, export paths) on every rank.
    With handle_signals, SIGUSR1/SIGTERM stop the run at the next step with a checkpoint (summary "preempted")."""
    trainer = Trainer(cfg)
    try:
        return _train(trainer, handle_signals)
    finally:
        if trainer.lock is not None:
            trainer.lock.release()


def _train(trainer: Trainer, handle_signals: bool) -> dict[str, Any]:
    trainer.build()
    if trainer.is_complete():
        log(f"run {trainer.run_dir} is already complete: {trainer.step} steps; its exports are in "
            f"{trainer.run_dir / 'export'}")
        return trainer.summary([], complete=True)
    trainer.preemption = Preemption.install() if handle_signals else None
    try:
        try:
            trainer.loop()
        except Preempted as e:
            requeued = False
            if str(e) == "SIGUSR1" and "SLURM_JOB_ID" in os.environ and trainer.env.is_main:
                problem = requeue_slurm_job()
                requeued = problem is None
                log(f"requeued SLURM job {os.environ.get('SLURM_JOB_ID')}: it resumes at step {trainer.step}"
                    if requeued else f"WARNING: could not requeue: {problem}; resubmit to resume")
            cdist.barrier()  # no rank exits (and so ends the job step) before rank 0 has requeued the job
            return trainer.summary([], preempted=str(e), requeued=requeued)
        # A stop signal during the export is recorded and ignored: the run is at its last step, and an export cut
        # short by the default action would leave .partial files for the next submission to redo.
        written = trainer.finish()
    finally:
        if trainer.preemption is not None:
            trainer.preemption.uninstall()
        trainer.reporter.close()
    return trainer.summary(written)


def evaluate_exports(cfg: Config, run_dir: Path, exports: list[Path], device: torch.device) -> Path:
    """Evaluate every exported model on the configured sets; results in run_dir/eval.json (rank 0 only)."""
    from .config import ModelConfig
    from .eval import evaluate_all
    results = {}
    for path in exports:
        clip, _, preprocess, tokenizer = cmodel.create(ModelConfig(name=cfg.model.name, pretrained=str(path)), device)
        e = cfg.eval
        try:
            results[path.name] = evaluate_all(clip, preprocess, tokenizer, sugarcrepe_dir=e.sugarcrepe_dir,
                                              zeroshot_dir=e.zeroshot_dir, retrieval_dir=e.retrieval_dir,
                                              aro_dir=e.aro_dir, aro_coco_root=e.aro_coco_root,
                                              aro_flickr_root=e.aro_flickr_root, device=device,
                                              batch_size=e.batch_size, strict=e.strict,
                                              max_missing_share=e.max_missing_share, seed=cfg.run.seed)
        except (ValueError, FileNotFoundError) as err:
            raise UserError(f"eval of {path.name}: {err}") from None
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
    summary = train(cfg, handle_signals=True)
    if summary.get("preempted"):
        log(f"stopped by {summary['preempted']} at step {summary['steps']}; the checkpoint is saved: run the same "
            f"command again to resume (exit status {PREEMPTED_EXIT})")
        return PREEMPTED_EXIT
    if not summary.get("complete"):
        log(f"done: {summary['steps']} steps, final loss {summary['loss']:.4f}, run directory {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
