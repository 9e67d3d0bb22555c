"""Watching a run: per-step scalars and events to metrics.jsonl, TensorBoard and Weights & Biases (offline).

    reporter = build_reporters(cfg.run, run_dir, is_main=env.is_main)   # run.report_to: [jsonl, tensorboard]
    reporter.log(step, {"loss": 0.71, "loss_i2t": 0.80, "lr": 1e-6, ...})
    reporter.event("eval", step, sugarcrepe_average=0.81)
    reporter.close()

    tensorboard --logdir runs/clove/tensorboard          # watch it
    wandb sync runs/clove/wandb/offline-run-*            # upload an offline W&B run later, from a connected machine

Every rank may call the same methods: only the main rank writes (the others get a reporter that does nothing),
so the training loop needs no `if is_main` around them. Values must already be reduced across ranks.

Sinks (`run.report_to`, any of):
  jsonl        run_dir/metrics.jsonl, one JSON object per line with "step" first; events carry "event": name.
               Appended, so a resumed run continues the same file. Each line is flushed as it is written.
  tensorboard  run_dir/tensorboard/, torch.utils.tensorboard's SummaryWriter (needs the `tensorboard` package);
               one scalar per key, tagged "train/<key>" unless the key already names a group ("eval/...").
               Events become scalars "<name>/<field>" for their numeric fields.
  wandb        run_dir/wandb/, `wandb.init(mode="offline")`: works without a network. wandb is optional; when
               it is not installed, asking for it is a one-line error.

The per-step names the trainer logs (METRIC_NAMES documents them) are the contract between the loop and plots.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from .errors import UserError

SINKS: tuple[str, ...] = ("jsonl", "tensorboard", "wandb")

# name -> meaning; what the training loop logs each log step (all reduced over ranks, rank 0 writes them).
METRIC_NAMES: dict[str, str] = {
    "loss": "training loss, the mean over ranks of (loss_i2t + loss_t2i) / 2",
    "loss_i2t": "image -> text cross-entropy (rows: images; columns: all texts and negatives)",
    "loss_t2i": "text -> image cross-entropy (rows: positive texts; columns: all images)",
    "neg_acc": "share of images whose own caption outscores their hard negative(s) (images with a negative only)",
    "neg_margin": "mean of s(image, caption) - max s(image, its negatives), cosine units, over the same images",
    "lr": "learning rate used by this step",
    "logit_scale": "exp(logit_scale), the softmax temperature's inverse, after clamping",
    "data_wait_s": "seconds per step spent waiting for the next batch (mean over the log window)",
    "compute_s": "seconds per step in forward, backward and optimizer step (mean over the log window)",
    "samples_per_s_per_device": "training samples per second per rank over the log window",
    "samples": "samples drawn so far, all ranks together",
    "negatives": "valid negative texts in the step's global batch",
    "skipped_*": "samples skipped so far, by cause (e.g. skipped_decode, skipped_no_caption)",
}


def hard_negative_stats(image_features, text_features, negative_features, negative_owner):
    """Sums behind neg_acc and neg_margin for one rank's batch, a float64 tensor [3] to be all-reduced before
    dividing (no host sync here: it runs every step, the division only on log steps).

    image_features (B, D), text_features (B, D) positive captions, negative_features (N, D), all L2-normalised;
    negative_owner (N,) long: the batch index of the image each negative was made for. Per image with at least
    one negative: margin = s(image, caption) - max over its negatives s(image, negative); correct = margin > 0
    (a tie is not a win). Returns [num_images_with_negatives, num_correct, margin_sum]; see neg_metrics.
    """
    import torch
    with torch.no_grad():
        img, txt, neg = image_features.float(), text_features.float(), negative_features.float()
        pos = (img * txt).sum(-1)  # (B,)
        neg_scores = (img[negative_owner] * neg).sum(-1)  # (N,) each negative against its own image
        best = torch.full_like(pos, float("-inf")).scatter_reduce(0, negative_owner, neg_scores, reduce="amax")
        has = torch.isfinite(best)
        margin = torch.where(has, pos - best, torch.zeros_like(pos))
        return torch.stack([has.sum().double(), ((margin > 0) & has).sum().double(), margin.sum().double()])


def neg_metrics(sums) -> dict[str, float]:
    """neg_acc and neg_margin from hard_negative_stats sums (summed over ranks); empty when no image had one."""
    num, correct, margin = (float(x) for x in sums)
    return {"neg_acc": correct / num, "neg_margin": margin / num} if num else {}


class Reporter(Protocol):
    def log(self, step: int, scalars: Mapping[str, float]) -> None: ...
    def event(self, name: str, step: int, **fields: Any) -> None: ...
    def close(self) -> None: ...


def _number(value: Any) -> float | None:
    """A finite or non-finite float for a scalar sink, None for anything that is not a number."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    try:
        import torch
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return float(value.item())
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return None


def _json_value(value: Any) -> Any:
    number = _number(value)
    if number is None:
        return value
    if isinstance(value, (bool, int)) and not isinstance(value, float):
        return value
    return number if math.isfinite(number) else str(number)  # JSON has no NaN/inf: keep them readable


class NullReporter:
    """What non-main ranks get: accepts everything, writes nothing."""

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        pass

    def event(self, name: str, step: int, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlReporter:
    """run_dir/metrics.jsonl: {"step": step, **scalars} per log call, {"step", "event", **fields} per event."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, default=str) + "\n")  # a Path or tensor field never breaks a line
        self._file.flush()

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self._write({"step": int(step), **{k: _json_value(v) for k, v in scalars.items()}})

    def event(self, name: str, step: int, **fields: Any) -> None:
        self._write({"step": int(step), "event": name, **{k: _json_value(v) for k, v in fields.items()}})

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _tag(key: str) -> str:
    return key if "/" in key else f"train/{key}"


class TensorBoardReporter:
    """run_dir/tensorboard: one scalar series per key."""

    def __init__(self, run_dir: str | os.PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("run.report_to: tensorboard needs the `tensorboard` package (pip install tensorboard)"
                            ) from None
        self.log_dir = Path(run_dir) / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            number = _number(value)
            if number is not None:
                self._writer.add_scalar(_tag(key), number, global_step=int(step))
        self._writer.flush()

    def event(self, name: str, step: int, **fields: Any) -> None:
        for key, value in fields.items():
            number = _number(value)
            if number is not None:
                self._writer.add_scalar(f"{name}/{key}", number, global_step=int(step))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbReporter:
    """An offline W&B run under run_dir/wandb (synced later with `wandb sync`)."""

    def __init__(self, run_dir: str | os.PathLike, name: str, config: Mapping[str, Any] | None = None):
        try:
            import wandb
        except ImportError:
            raise UserError("run.report_to: wandb is not installed (pip install wandb), or leave it out of "
                            "run.report_to") from None
        (Path(run_dir) / "wandb").mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        self._run = wandb.init(mode="offline", dir=str(run_dir), name=name, config=dict(config or {}))

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        data = {_tag(k): n for k, v in scalars.items() if (n := _number(v)) is not None}
        self._run.log(data, step=int(step))

    def event(self, name: str, step: int, **fields: Any) -> None:
        data = {f"{name}/{k}": n for k, v in fields.items() if (n := _number(v)) is not None}
        self._run.log(data, step=int(step))

    def close(self) -> None:
        self._run.finish()


class MultiReporter:
    """Fans every call out to several sinks, closing all of them even when one fails."""

    def __init__(self, sinks: Iterable[Reporter]):
        self.sinks = list(sinks)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for s in self.sinks:
            s.log(step, scalars)

    def event(self, name: str, step: int, **fields: Any) -> None:
        for s in self.sinks:
            s.event(name, step, **fields)

    def close(self) -> None:
        errors = []
        for s in self.sinks:
            try:
                s.close()
            except Exception as e:  # close the others before reporting the first failure
                errors.append(e)
        if errors:
            raise errors[0]


def sink_names(run_cfg_or_list: Any) -> tuple[str, ...]:
    """The sink list from a RunConfig (its report_to) or from a list/tuple/comma-separated string; checked."""
    value = getattr(run_cfg_or_list, "report_to", run_cfg_or_list)
    if isinstance(value, str):
        value = [v for v in (p.strip() for p in value.split(",")) if v]
    names = tuple(value or ())
    for n in names:
        if n not in SINKS:
            raise UserError(f"run.report_to: {n!r} is not one of {', '.join(SINKS)}")
    if len(set(names)) != len(names):
        raise UserError(f"run.report_to: {list(names)} names a sink twice")
    return names


def build_reporters(run_cfg_or_list: Any, run_dir: str | os.PathLike, is_main: bool,
                    config: Mapping[str, Any] | None = None) -> Reporter:
    """One Reporter writing to every sink in `run.report_to` on the main rank; a NullReporter elsewhere.

    run_cfg_or_list: a RunConfig (report_to, name) or a list of sink names. config: the resolved config, recorded
    by W&B. Unknown names and a missing optional package are UserErrors, raised on every rank alike.
    """
    names = sink_names(run_cfg_or_list)
    import importlib.util
    for sink, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        # Checked on every rank, so a missing package stops all ranks rather than leaving rank 0 alone.
        if sink in names and importlib.util.find_spec(package) is None:
            raise UserError(f"run.report_to: {sink} needs the `{package}` package, which is not installed "
                            f"(pip install {package}), or leave {sink} out of run.report_to")
    if not is_main:
        return NullReporter()
    name = getattr(run_cfg_or_list, "name", Path(run_dir).name)
    sinks: list[Reporter] = []
    try:
        for n in names:
            if n == "jsonl":
                sinks.append(JsonlReporter(run_dir))
            elif n == "tensorboard":
                sinks.append(TensorBoardReporter(run_dir))
            elif n == "wandb":
                sinks.append(WandbReporter(run_dir, name, config))
    except BaseException:
        for s in sinks:
            s.close()
        raise
    return MultiReporter(sinks)


__all__ = ["build_reporters", "sink_names", "hard_negative_stats", "neg_metrics", "Reporter", "NullReporter", "JsonlReporter",
           "TensorBoardReporter", "WandbReporter", "MultiReporter", "METRIC_NAMES", "SINKS"]
