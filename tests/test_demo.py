"""`clove-dist demo` end to end at a small size: every stage runs for real and the table has its three models."""
from __future__ import annotations

import json

import pytest

from clove_dist.cli import main as cli_main

pytestmark = pytest.mark.slow


def test_small_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = cli_main(["demo", "--out", str(out), "--num-train", "256", "--num-pretrain", "128", "--num-eval", "8",
                   "--num-zeroshot-per-class", "1", "--base-steps", "4", "--clove-steps", "3", "--batch-size", "16",
                   "--workers", "0", "--ablations"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    table = (out / "results.md").read_text()
    assert table.strip() in captured.out  # the table printed is the one written
    rows = table.strip().splitlines()
    assert len(rows) == 5 and "base (alpha 0)" in rows[2] and "CLoVe (alpha 0.6)" in rows[3]
    for a in ("0", "0.6", "1"):
        res = json.loads((out / f"eval_alpha{a}.json").read_text())
        assert 0.0 <= res["sugarcrepe"]["average"] <= 1.0 and 0.0 <= res["zeroshot"]["top1"] <= 1.0
        assert (out / f"patched_alpha{a}.safetensors").is_file()
    # the alpha sweep: 0 to 1 in steps of 0.2, the same evaluations as the table's rows, and its picture
    swept = json.loads((out / "sweep.json").read_text())["rows"]
    assert [r["alpha"] for r in swept] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[16:24] == (700).to_bytes(4, "big") + (500).to_bytes(4, "big")
    assert str(out / "sweep.png") in captured.out
    # clove-tiny-rn has BatchNorm: the patched models' statistics come from the fine-tuning images (all 256 here)
    assert json.loads((out / "sweep.json").read_text())["bn_images"] == 256
    rows = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["alpha"]) for r in rows] == [("base (alpha 0)", 0.0), ("CLoVe (alpha 0.6)", 0.6),
                                                        ("fine-tuned (alpha 1)", 1.0)]
    for r, a in zip(rows, ("0", "0.6", "1")):  # percent, the same numbers as the per-model evaluation files
        res = json.loads((out / f"eval_alpha{a}.json").read_text())
        assert r["sugarcrepe_avg"] == round(100 * res["sugarcrepe"]["average"], 2)
        assert r["zeroshot_top1"] == round(100 * res["zeroshot"]["top1"], 2)
        assert r["sugarcrepe_avg"] == round(100 * next(x for x in swept if x["alpha"] == r["alpha"])["sugarcrepe"], 2)
    # The ablations: one fine-tuning run each from the same base, each at alpha 0.6 and 1, beside full CLoVe.
    ablations = json.loads((out / "ablations.json").read_text())
    assert len(ablations) == 2 + 2 * 4 and (out / "ablations.md").read_text().strip() in captured.out
    assert ablations[0]["sugarcrepe_avg"] == rows[1]["sugarcrepe_avg"]
    no_negatives = [json.loads(x) for x in (out / "runs" / "ablation1" / "metrics.jsonl").read_text().splitlines()]
    replace_only = [json.loads(x) for x in (out / "runs" / "ablation3" / "metrics.jsonl").read_text().splitlines()]
    assert no_negatives[-1].get("negatives", 0) == 0 and replace_only[-1]["negatives"] > 0
    assert "caption_key: txt" in (out / "runs" / "ablation2" / "config.yaml").read_text()
    base_metrics = [json.loads(x) for x in (out / "runs" / "base" / "metrics.jsonl").read_text().splitlines()]
    assert base_metrics[-1].get("negatives", 0) == 0  # the base saw no hard negatives
    clove_metrics = [json.loads(x) for x in (out / "runs" / "clove" / "metrics.jsonl").read_text().splitlines()]
    assert clove_metrics[-1]["negatives"] > 0  # the fine-tuning stage trained with hard negatives
    assert clove_metrics[-1]["negatives_num_cached_parse"] > 0  # ... read from the sidecars, not parsed again
    assert sorted(p.name for p in (out / "world" / "train").glob("*.tar")) == [f"{i:05d}.tar" for i in range(4)]
    assert sorted(p.name for p in (out / "world" / "pretrain").glob("*.tar")) == [f"{i:05d}.tar" for i in range(2)]
    # `clove-dist negatives` wrote the corpus vocabulary and the fine-tuning run restricted REPLACE to it.
    assert (out / "world" / "train" / "negatives.vocab.json").is_file()
    resolved = (out / "runs" / "clove" / "config.yaml").read_text()
    assert "negatives.vocab.json" in resolved


def test_demo_draws_its_world_for_the_configured_model(tmp_path, capsys):
    """--config naming another model (clove-micro, 32 px): the world is drawn at that model's resolution and every
    stage trains and evaluates that model."""
    from clove_dist.config import packaged_config
    config = tmp_path / "micro.yaml"
    config.write_text(packaged_config("demo").read_text().replace("name: clove-tiny-rn", "name: clove-micro", 1))
    out = tmp_path / "demo"
    rc = cli_main(["demo", "--out", str(out), "--config", str(config), "--num-pretrain", "64", "--num-eval", "4",
                   "--num-zeroshot-per-class", "1", "--base-steps", "2", "--clove-steps", "2",
                   "--batch-size", "8", "--workers", "0", "--sweep-alphas", "0.6"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    world = json.loads((out / "world" / "world.json").read_text())
    assert world["image_size"] == 32  # default demo: 64
    assert world["num_train"] == 2 * 8  # by default one pass: --clove-steps x --batch-size
    assert "name: clove-micro" in (out / "runs" / "clove" / "config.yaml").read_text()
    swept = json.loads((out / "sweep.json").read_text())
    assert swept["model"] == "clove-micro" and swept["bn_images"] == 0  # a ViT: no BatchNorm to recompute


def test_seeds_table_mean_and_spread():
    from clove_dist.demo import seeds_table
    row = lambda v: {"model": "m", "replace": v, "swap": v, "add": v, "sugarcrepe_avg": v, "zeroshot_top1": v}  # noqa: E731
    table = seeds_table([[row(60.0)], [row(64.0)], [row(65.0)]])
    # mean 63.0; sample standard deviation sqrt(((-3)^2 + 1^2 + 2^2) / 2) = sqrt(7) = 2.65
    assert table.splitlines()[2] == "| m | " + " | ".join(["63.0 +- 2.6 (60.0-65.0)"] * 5) + " |"
