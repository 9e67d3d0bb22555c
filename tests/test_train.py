"""Single-process training as a user runs it (`clove-dist train`, no launcher): trains, checkpoints, exports weights
open_clip loads, resumes where it stopped, and turns user mistakes into one line with nothing written."""
from __future__ import annotations

import json
import math

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from clove_dist.cli import main as cli_main
from clove_dist.model import make_deepspeed_safe


def _args(world, out, *extra):
    return ["train", "--config", "configs/debug.yaml",
            "--set", f"data.train_shards={world.train_pattern}", "--set", f"run.output_dir={out}",
            "--set", "model.name=clove-micro", "--set", "data.batch_size=8", "--set", "data.num_workers=0",
            "--set", "negatives.style=none", "--set", "run.log_every=1", "--set", "checkpoint.every_steps=2",
            "--set", "optim.warmup_steps=2", "--set", "patching.alphas=[0.5]", *extra]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def test_train_checkpoint_export_resume(world, tmp_path, capsys):
    assert cli_main(_args(world, tmp_path, "--set", "train.max_steps=3")) == 0
    run = tmp_path / "debug"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in lines)
    assert lines[-1]["samples"] == 24
    # the warm-up ramps the learning rate: lr at step 1 is half the peak (2 warm-up steps)
    assert lines[0]["lr"] == pytest.approx(5e-4 / 2)
    assert (run / "checkpoints" / "latest").read_text() == "step000000003"
    assert (run / "config.yaml").is_file()

    fine = run / "export" / "finetuned.safetensors"
    model = open_clip.create_model("clove-micro", pretrained=str(fine))  # what a user does with the export
    state = load_file(str(fine))
    assert state["logit_scale"].shape == torch.Size([])  # DeepSpeed's [1] shape is undone on export
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    # training moved the weights away from the initialisation that patching interpolates from
    patched = load_file(str(run / "export" / "patched_alpha0.5.safetensors"))
    w = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert not torch.equal(patched[w], state[w])

    capsys.readouterr()
    assert cli_main(_args(world, tmp_path, "--set", "train.max_steps=5")) == 0
    # a second run in the same process is still a single process, though setup() wrote RANK into the environment
    assert "single: 1 rank(s) on cpu" in capsys.readouterr().err
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lines = [r for r in records if "event" not in r]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]  # resumed at 3, not restarted
    assert [(r["event"], r["step"]) for r in records if "event" in r] == [("resumed", 3)]
    assert lines[-1]["samples"] == 40
    assert (run / "checkpoints" / "latest").read_text() == "step000000005"
    kept = sorted(p.name for p in (run / "checkpoints").glob("step*"))
    assert kept == ["step000000004", "step000000005"]  # keep_last: 2
    assert (run / "config.step000000003.yaml").is_file()  # the changed max_steps is recorded, the original kept


def test_user_mistakes_are_one_line(world, tmp_path, capsys):
    assert cli_main(_args(world, tmp_path, "--set", "optim.lrr=1")) == 2
    assert "unknown config key 'optim.lrr' (did you mean 'lr'?)" in capsys.readouterr().err
    assert cli_main(_args(world, tmp_path, "--set", f"data.train_shards={tmp_path}/none-{{0..3}}.tar")) == 2
    assert "4 of 4 shard files do not exist" in capsys.readouterr().err
    wrong = open_clip.create_model("clove-tiny")
    torch.save(wrong.state_dict(), tmp_path / "tiny.pt")
    assert cli_main(_args(world, tmp_path, "--set", f"model.pretrained={tmp_path}/tiny.pt")) == 2
    err = capsys.readouterr().err
    assert "does not hold weights of clove-micro" in err and "Traceback" not in err
    assert not (tmp_path / "debug").exists()  # nothing was written by the failed runs


def test_make_deepspeed_safe_keeps_values():
    model = open_clip.create_model("clove-micro")
    before = model.logit_scale.detach().clone()
    shapes = make_deepspeed_safe(model)
    assert shapes == {"logit_scale": torch.Size([])}
    assert model.logit_scale.shape == (1,) and model.logit_scale.requires_grad
    assert float(model.logit_scale) == float(before)


def test_training_evaluates_its_exports_and_eval_cli(world, tmp_path, capsys):
    args = _args(world, tmp_path, "--set", "train.max_steps=2", "--set", f"eval.sugarcrepe_dir={world.sugarcrepe_dir}",
                 "--set", f"eval.zeroshot_dir={world.zeroshot_dir}", "--set", "run.name=evaluated")
    assert cli_main(args) == 0
    results = json.loads((tmp_path / "evaluated" / "eval.json").read_text())
    assert sorted(results) == ["finetuned.safetensors", "patched_alpha0.5.safetensors"]
    fine = tmp_path / "evaluated" / "export" / "finetuned.safetensors"
    capsys.readouterr()
    out = tmp_path / "cli.json"
    assert cli_main(["eval", "--model", "clove-micro", "--pretrained", str(fine), "--sugarcrepe",
                     world.sugarcrepe_dir, "--zeroshot", world.zeroshot_dir, "--out", str(out)]) == 0
    cli = json.loads(out.read_text())
    # the same weights, the same sets: the CLI and the end-of-training evaluation agree exactly
    assert cli["sugarcrepe"]["average"] == results["finetuned.safetensors"]["sugarcrepe"]["average"]
    assert cli["zeroshot"]["top1"] == results["finetuned.safetensors"]["zeroshot"]["top1"]
    capsys.readouterr()
    assert cli_main(["eval", "--model", "clove-micro", "--sugarcrepe", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: eval:") and err.count("\n") == 1


def test_misconfigured_data_and_resume_are_one_line(world, tmp_path, capsys):
    # every sample skipped (no such caption field, no fallback): stop with one line instead of waiting for ever
    args = _args(world, tmp_path, "--set", "data.caption_key=json.nope", "--set", "data.fallback_caption_key=",
                 "--set", "train.max_steps=2", "--set", "run.name=nocaption")
    assert cli_main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: 10000 samples in a row were skipped (last: no_caption")
    # one pass over too few samples for one batch
    args = _args(world, tmp_path, "--set", "data.resampled=false", "--set", "data.batch_size=1000",
                 "--set", "train.max_steps=2", "--set", "run.name=toofew")
    assert cli_main(args) == 2
    assert "gave a rank no full batch of 1000" in capsys.readouterr().err
    # resume: none over a directory that holds an earlier run's checkpoints
    assert cli_main(_args(world, tmp_path, "--set", "train.max_steps=1", "--set", "run.name=again")) == 0
    capsys.readouterr()
    assert cli_main(_args(world, tmp_path, "--set", "train.max_steps=1", "--set", "run.name=again",
                          "--set", "checkpoint.resume=none")) == 2
    assert "already holds checkpoints of an earlier run" in capsys.readouterr().err


def test_config_history_follows_every_resume(tmp_path):
    """config.<T>.yaml records a resume from T under a changed config, a return to an earlier config included; the
    config a checkpoint was written under is the newest one from before its tag."""
    from clove_dist.config import load_config
    from clove_dist.train import config_file_for, write_run_config
    a, b = load_config(None, ["optim.lr=0.001"]), load_config(None, ["optim.lr=0.002"])
    names = lambda: sorted(p.name for p in tmp_path.glob("config*.yaml"))  # noqa: E731
    write_run_config(a, tmp_path, None)
    write_run_config(a, tmp_path, "step000000010")  # resumed unchanged: nothing new
    assert names() == ["config.yaml"]
    write_run_config(b, tmp_path, "step000000010")
    write_run_config(b, tmp_path, "step000000015")  # unchanged against the config in effect (B): nothing new
    write_run_config(a, tmp_path, "step000000020")  # back to A: a change too
    assert names() == ["config.step000000010.yaml", "config.step000000020.yaml", "config.yaml"]
    written_under = {tag: config_file_for(tmp_path, tag).name for tag in
                     ("step000000010", "step000000015", "step000000020", "step000000030")}
    assert written_under == {"step000000010": "config.yaml", "step000000015": "config.step000000010.yaml",
                             "step000000020": "config.step000000010.yaml",
                             "step000000030": "config.step000000020.yaml"}
    assert "lr: 0.001" in (tmp_path / "config.step000000020.yaml").read_text()
