"""Evaluation of the current weights every `eval.every_steps` training steps.

    evaluator = TrainingEvaluator(cfg.eval, cfg.model.name, run_dir, device, seed=cfg.run.seed)
    evaluator.forget_after(start_step, env.is_main)        # after resuming, before the first step
    ...
    if evaluator.due(step):
        state = full_state_dict(clip, original_shapes, keep=env.is_main)   # collective: every rank calls it
        metrics = evaluator.run(step, state if env.is_main else None, is_main=env.is_main, reporter=reporter)

Who does what: the weights are gathered once by every rank (under ZeRO-3 no rank holds them otherwise: the
gather is `deepspeed.zero.GatheredParameters` / `safe_get_full_fp32_param` on every parameter, a collective), and
only rank 0 keeps a CPU copy. Rank 0 loads it into a separate evaluation model (built once, fp32, kept between
evaluations; the engine's module is never touched, so ZeRO hooks and training state stay as they are), runs
every configured evaluation, writes run_dir/eval/step_<N>.json and logs the headline numbers through the
reporter. The other ranks do not sit in a collective meanwhile (an evaluation can outlast NCCL's timeout): they
poll the file system for that result file (or the error file rank 0 writes if it fails) and continue with the
same numbers. The run directory must therefore be on a file system every node sees, as checkpoints are.

Evaluating the fp32 master weights rank 0 gathers is evaluating exactly what an export at that step would hold.

With `eval.sharded: true` every rank keeps the gathered weights (full_state_dict(..., keep=True) on all ranks)
and encodes every world_size-th image and text; features are gathered (all_gather_object) and every rank
computes the same metrics, in about 1/world_size of the time. The gathers are collectives, so every rank must
call run() at the same steps; rank 0 still writes the result file and logs.
"""
from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from . import evaluate_all, headline_metrics
from .sharding import Shard


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class EvaluationFailed(RuntimeError):
    """Rank 0's evaluation raised; the message is its error, so every rank stops with the same line."""


class TrainingEvaluator:
    """Runs the configured evaluations on rank 0 at `eval.every_steps`; the other ranks wait on the file system."""

    def __init__(self, eval_cfg: Any, model_name: str, run_dir: str | os.PathLike, device: str | torch.device,
                 seed: int = 0, poll_s: float = 1.0):
        self.cfg = eval_cfg
        self.model_name = model_name
        self.dir = Path(run_dir) / "eval"
        self.device = device
        self.seed = seed
        self.poll_s = poll_s
        self._model = None  # (clip, preprocess, tokenizer), built on first use on rank 0

    @property
    def enabled(self) -> bool:
        c = self.cfg
        return c.every_steps > 0 and bool(c.sugarcrepe_dir or c.zeroshot_dir or c.retrieval_dir or c.aro_dir)

    def due(self, step: int) -> bool:
        return self.enabled and step > 0 and step % self.cfg.every_steps == 0

    def paths(self, step: int) -> tuple[Path, Path]:
        return self.dir / f"step_{step:08d}.json", self.dir / f"step_{step:08d}.error"

    def _eval_model(self, state: dict[str, torch.Tensor]):
        if self._model is None:
            from .. import model as cmodel
            from ..config import ModelConfig
            clip, _, preprocess, tokenizer = cmodel.create(ModelConfig(name=self.model_name, pretrained=""),
                                                           self.device)
            self._model = (clip, preprocess, tokenizer)
        clip = self._model[0]
        missing, unexpected = clip.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"evaluation model {self.model_name}: state dict does not match (missing "
                               f"{missing[:3]}, unexpected {unexpected[:3]})")
        return self._model

    def forget_after(self, step: int, is_main: bool) -> None:
        """Rank 0 removes result and error files of steps after `step` (left by an attempt that was preempted
        after evaluating), so a waiting rank never takes an old file for this attempt's result. Call it once
        after resuming and before the first training step: the steps' collectives then order it before any wait.
        """
        if not is_main or not self.dir.is_dir():
            return
        for path in self.dir.glob("step_*"):
            stem = path.name.split(".")[0]
            number = stem[len("step_"):]
            if number.isdigit() and int(number) > step:
                path.unlink(missing_ok=True)

    def evaluate(self, state: dict[str, torch.Tensor], shard: Shard | None = None) -> dict:
        """All configured evaluations of the weights in `state` (with a shard: this rank's share of the
        encoding, the same full result on every rank)."""
        clip, preprocess, tokenizer = self._eval_model(state)
        c = self.cfg
        return evaluate_all(clip, preprocess, tokenizer, sugarcrepe_dir=c.sugarcrepe_dir,
                            sugarcrepe_image_dir=getattr(c, "sugarcrepe_image_dir", ""), zeroshot_dir=c.zeroshot_dir,
                            retrieval_dir=c.retrieval_dir, aro_dir=c.aro_dir,
                            aro_coco_root=getattr(c, "aro_coco_root", ""),
                            aro_flickr_root=getattr(c, "aro_flickr_root", ""), device=self.device,
                            batch_size=c.batch_size, strict=c.strict, max_missing_share=c.max_missing_share,
                            seed=self.seed, shard=shard)

    def run(self, step: int, state: dict[str, torch.Tensor] | None, *, is_main: bool, reporter: Any = None,
            timeout_s: float | None = None) -> dict[str, float]:
        """Rank 0: evaluate `state`, write the result, log it; others: wait for that result. Every rank returns
        the headline metrics ({"eval/...": value}). EvaluationFailed on every rank if rank 0's evaluation fails;
        TimeoutError when waiting longer than timeout_s (None: eval.wait_timeout_s)."""
        done, failed = self.paths(step)
        shard = Shard.current() if getattr(self.cfg, "sharded", False) else None
        if shard is not None:  # every rank holds the weights and encodes its share; no waiting
            if state is None:
                raise ValueError("eval.sharded: every rank needs the gathered state dict (keep=True on all ranks)")
            t0 = time.perf_counter()
            results = self.evaluate(state, shard)
            results.update(step=step, eval_s=time.perf_counter() - t0, num_ranks=shard.world_size)
            headline = headline_metrics(results)
            if is_main:
                self.dir.mkdir(parents=True, exist_ok=True)
                _atomic_write_text(done, json.dumps(results, indent=2) + "\n")
                if reporter is not None:
                    reporter.log(step, {**headline, "eval/eval_s": results["eval_s"]})
            return headline
        if is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if state is None:
                raise ValueError("rank 0 needs the gathered state dict to evaluate")
            t0 = time.perf_counter()
            try:
                results = self.evaluate(state)
            except Exception as e:
                _atomic_write_text(failed, f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
                raise
            results["step"] = step
            results["eval_s"] = time.perf_counter() - t0
            _atomic_write_text(done, json.dumps(results, indent=2) + "\n")
            headline = headline_metrics(results)
            if reporter is not None:
                reporter.log(step, {**headline, "eval/eval_s": results["eval_s"]})
            return headline
        timeout = self.cfg.wait_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        while not done.is_file():
            if failed.is_file():
                raise EvaluationFailed(f"evaluation at step {step} failed on rank 0: "
                                       f"{failed.read_text().splitlines()[0]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for rank 0's evaluation at step {step} ({done}); "
                                   f"is {self.dir} on a file system every node sees?")
            time.sleep(self.poll_s)
        return headline_metrics(json.loads(done.read_text()))


__all__ = ["TrainingEvaluator", "EvaluationFailed"]
