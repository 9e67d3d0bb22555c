"""Run watching: metrics.jsonl, TensorBoard event files read back, the W&B gate, hard-negative statistics."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

from clove_dist.config import RunConfig, from_dict
from clove_dist.errors import UserError
from clove_dist.reporting import (METRIC_NAMES, NullReporter, build_reporters, hard_negative_stats, neg_metrics,
                                 sink_names)

STEP_METRICS = {"loss": 0.75, "loss_i2t": 0.8, "loss_t2i": 0.7, "neg_acc": 0.625, "neg_margin": 0.031,
                "lr": 1e-6, "logit_scale": 100.0, "data_wait_s": 0.01, "compute_s": 0.2,
                "samples_per_s_per_device": 1280.0, "negatives": 256, "skipped_decode": 3}


def _read_tensorboard(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_jsonl_and_tensorboard_hold_what_was_logged(tmp_path):
    cfg = from_dict({"run": {"report_to": ["jsonl", "tensorboard"]}})
    rep = build_reporters(cfg.run, tmp_path, is_main=True)
    for step in (10, 20, 30):
        rep.log(step, {k: v * step for k, v in STEP_METRICS.items()} | {"nan_loss": float("nan")})
    rep.event("eval", 30, sugarcrepe_average=0.81, note="text fields stay in jsonl only", where=tmp_path)
    rep.log(30, {"eval/zeroshot_top1": 0.4})
    rep.close()

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [10, 20, 30, 30, 30] and list(lines[0])[0] == "step"
    assert lines[1]["loss_i2t"] == pytest.approx(16.0) and lines[1]["negatives"] == 5120
    assert lines[0]["nan_loss"] == "nan"  # JSON has no NaN: kept readable, never a broken line
    assert lines[3] == {"step": 30, "event": "eval", "sugarcrepe_average": 0.81,
                        "note": "text fields stay in jsonl only", "where": str(tmp_path)}

    scalars = _read_tensorboard(tmp_path / "tensorboard")
    for name, value in STEP_METRICS.items():
        got = scalars[f"train/{name}"]
        assert [s for s, _ in got] == [10, 20, 30]
        # TensorBoard stores float32: relative 1e-6 is its rounding.
        assert [v for _, v in got] == pytest.approx([value * s for s in (10, 20, 30)], rel=1e-6)
    assert math.isnan(scalars["train/nan_loss"][0][1])
    assert scalars["eval/sugarcrepe_average"] == [(30, pytest.approx(0.81))]
    assert scalars["eval/zeroshot_top1"] == [(30, pytest.approx(0.4))]  # a grouped key keeps its group


def test_non_main_ranks_write_nothing(tmp_path):
    rep = build_reporters(["jsonl", "tensorboard"], tmp_path, is_main=False)
    assert isinstance(rep, NullReporter)
    rep.log(1, {"loss": 1.0})
    rep.close()
    assert list(tmp_path.iterdir()) == []


def test_sink_names_are_checked():
    assert sink_names(RunConfig()) == ("jsonl",)
    assert sink_names("jsonl, tensorboard") == ("jsonl", "tensorboard")
    with pytest.raises(UserError, match="'tensorbord' is not one of jsonl, tensorboard, wandb"):
        sink_names(["tensorbord"])
    with pytest.raises(UserError, match="twice"):
        sink_names(["jsonl", "jsonl"])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_the_package_is_one_line(tmp_path):
    with pytest.raises(UserError, match=r"wandb needs the `wandb` package") as info:
        build_reporters(["jsonl", "wandb"], tmp_path, is_main=False)  # refused on every rank alike
    assert "\n" not in str(info.value)
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_run_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    rep = build_reporters(["wandb"], tmp_path, is_main=True)
    rep.log(1, {"loss": 1.0})
    rep.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_every_documented_per_step_name_is_covered():
    assert set(STEP_METRICS) - {"skipped_decode"} <= set(METRIC_NAMES) and "skipped_*" in METRIC_NAMES


def test_hard_negative_stats_hand_computed():
    img = torch.eye(3)  # images along the axes
    txt = F.normalize(torch.tensor([[1.0, 0.2, 0.0], [0.0, 1.0, 0.0], [0.3, 0.0, 1.0]]), dim=-1)
    neg = F.normalize(torch.tensor([[0.5, 1.0, 0.0],   # image 0: 0.447 < its caption's 0.981 -> right
                                    [0.9, 0.1, 0.0],   # image 0 again: 0.994 > 0.981 -> the max decides: wrong
                                    [0.0, 1.0, 0.0]]), dim=-1)  # image 1: ties with its caption -> not a win
    owner = torch.tensor([0, 0, 1])  # image 2 has no negative: not counted
    num, correct, margin = hard_negative_stats(img, txt, neg, owner).tolist()
    pos0, pos1 = float(txt[0, 0]), float(txt[1, 1])
    best0 = max(float(neg[0, 0]), float(neg[1, 0]))
    assert num == 2 and correct == 0
    assert margin == pytest.approx((pos0 - best0) + (pos1 - 1.0), abs=1e-6)  # fp32 dot products
    empty = hard_negative_stats(img, txt, torch.empty(0, 3), torch.empty(0, dtype=torch.long))
    assert empty.tolist() == [0.0, 0.0, 0.0] and neg_metrics(empty) == {}
    one = hard_negative_stats(img, txt, neg[:1], owner[:1])
    assert one.tolist()[:2] == [1, 1]
    assert neg_metrics(one) == {"neg_acc": 1.0, "neg_margin": pytest.approx(pos0 - float(neg[0, 0]), abs=1e-6)}
