"""`clove-dist sweep` on the synthetic world: CSV, JSON and a real PNG of the expected size; every row equals the
evaluation of the same patched weights written to disk and loaded by open_clip."""
from __future__ import annotations

import csv
import json

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import clove_dist.model  # noqa: F401  (registers clove-micro)
from clove_dist.cli import main as cli_main
from clove_dist.patching.sweep import PLOT_DPI, PLOT_SIZE, parse_alphas


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweep_weights")
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        state = open_clip.create_model("clove-micro").state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, d / f"{name}.safetensors")
    return d


def test_parse_alphas():
    assert parse_alphas(["0:1:0.1"]) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert parse_alphas(["0.6", "0:1:0.5", "0.6"]) == [0.6, 0.0, 0.5, 1.0]
    assert parse_alphas(["-0.5:1.5:1"], allow_extrapolation=True) == [-0.5, 0.5, 1.5]


def test_sweep_writes_csv_json_png(world, weights, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--model", "clove-micro", "--pretrained", str(weights / "a.safetensors"), "--finetuned",
            str(weights / "b.safetensors"), "--alphas", "0:1:0.5", "--sugarcrepe", world.sugarcrepe_dir,
            "--zeroshot", world.zeroshot_dir, "--out", str(out), "--device", "cpu", "--save-patched"]
    assert cli_main(argv) == 0
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [float(r["alpha"]) for r in rows] == [0.0, 0.5, 1.0]
    data = json.loads((out / "sweep.json").read_text())
    assert [r["alpha"] for r in data["rows"]] == [0.0, 0.5, 1.0] and data["model"] == "clove-micro"
    with Image.open(out / "sweep.png") as im:
        im.load()  # decodes every pixel: a truncated or fake file fails here
        assert im.format == "PNG"
        assert im.size == (int(PLOT_SIZE[0] * PLOT_DPI), int(PLOT_SIZE[1] * PLOT_DPI))
        assert sum(1 for n in im.convert("L").histogram() if n) > 16  # something is drawn, not a blank canvas

    # every row is the evaluation of that alpha's weights as open_clip loads them from disk
    from clove_dist.config import ModelConfig
    from clove_dist.eval import evaluate_all
    from clove_dist.model import create
    for row in data["rows"]:
        path = out / f"patched_alpha{row['alpha']:g}.safetensors"
        clip, _, preprocess, tokenizer = create(ModelConfig(name="clove-micro", pretrained=str(path)))
        res = evaluate_all(clip, preprocess, tokenizer, sugarcrepe_dir=world.sugarcrepe_dir,
                           zeroshot_dir=world.zeroshot_dir)
        assert row["sugarcrepe"] == res["sugarcrepe"]["average"]
        assert row["zeroshot_top1"] == res["zeroshot"]["top1"]
    capsys.readouterr()

    assert cli_main(argv) == 2  # a second sweep into the same directory needs --overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err
    # --overwrite with fewer alphas: the earlier sweep's files of the alphas left out go, the others are rewritten
    assert cli_main(argv[:-1] + ["--save-patched", "--overwrite", "--alphas", "0", "1"]) == 0
    assert [r["alpha"] for r in json.loads((out / "sweep.json").read_text())["rows"]] == [0.0, 1.0]
    assert sorted(p.name for p in out.iterdir()) == [
        "eval_alpha0.json", "eval_alpha1.json", "patched_alpha0.safetensors", "patched_alpha1.safetensors",
        "sweep.csv", "sweep.json", "sweep.png"]
    capsys.readouterr()
    assert cli_main(argv[:-1] + ["--alphas", "0:1.2:0.6"]) == 2  # 1.2 without --allow-extrapolation
    err = capsys.readouterr().err
    assert "alpha must be in [0, 1], got 1.2" in err and err.count("\n") == 1
