"""`clove-dist patch --checkpoint RUN_DIR` on the ranks of a real 2-rank ZeRO-3 run (every parameter partitioned):
launched on the same 2 ranks, and on 1 (through the universal conversion), it writes, bit for bit, what the run's
own end-of-run export wrote; the offline patch of the same checkpoint agrees; bad input is one line, nothing
written."""
from __future__ import annotations

import sys

import pytest
import torch
from launch import run, torchrun, train_args
from safetensors.torch import load_file

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

TAG = "step000000002"


def _assert_bitwise(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def run_dir(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("patchrun")
    torchrun(2, "-m", "clove_dist.train", *train_args(
        world, out, "--set", "train.max_steps=2", "--set", "distributed.zero_stage=3",
        "--set", "distributed.stage3_param_persistence_threshold=0", "--set", "patching.alphas=[0.0,0.6]"))
    return out / "debug"


def test_patch_on_the_runs_ranks_equals_its_export(run_dir, tmp_path):
    torchrun(2, "-m", "clove_dist.cli", "patch", "--checkpoint", str(run_dir), "--alpha", "0", "0.6")
    names = ["finetuned.safetensors", "patched_alpha0.safetensors", "patched_alpha0.6.safetensors"]
    for name in names:
        _assert_bitwise(load_file(str(run_dir / "export" / TAG / name)), load_file(str(run_dir / "export" / name)))
    # one rank loads the 2-rank checkpoint through DeepSpeed's universal format: the same bits
    run([sys.executable, "-m", "clove_dist.cli", "patch", "--checkpoint", str(run_dir), "--tag", TAG,
         "--alpha", "0.6", "--out", str(tmp_path / "one")])
    for name in ["finetuned.safetensors", "patched_alpha0.6.safetensors"]:
        _assert_bitwise(load_file(str(tmp_path / "one" / name)), load_file(str(run_dir / "export" / name)))
    # offline, one tensor at a time, from the checkpoint directory
    from clove_dist.cli import main as cli_main
    assert cli_main(["patch", "--pretrained", str(run_dir / "export" / "patched_alpha0.safetensors"),
                     "--finetuned", str(run_dir / "checkpoints"), "--alpha", "0.6",
                     "--out", str(tmp_path / "offline.safetensors")]) == 0
    _assert_bitwise(load_file(str(tmp_path / "offline.safetensors")),
                    load_file(str(run_dir / "export" / "patched_alpha0.6.safetensors")))
    import open_clip

    import clove_dist.model  # noqa: F401  (registers clove-micro)
    model = open_clip.create_model("clove-micro", pretrained=str(run_dir / "export" / TAG / names[2]))
    assert model.logit_scale.shape == torch.Size([])


def test_patch_from_a_run_refuses_bad_input(run_dir, tmp_path, capsys):
    from clove_dist.cli import main as cli_main
    cases = [
        (["--checkpoint", str(tmp_path)], "is not a run directory"),
        (["--checkpoint", str(run_dir), "--tag", "final"], "is not a checkpoint tag"),
        (["--checkpoint", str(run_dir), "--tag", "step000000777"], "no such checkpoint in this run"),
        (["--checkpoint", str(run_dir), "--finetuned", str(run_dir)], "drop --finetuned"),
        (["--checkpoint", str(run_dir), "--alpha", "1.5", "--out", str(tmp_path / "x")], "[0, 1]"),
        (["--checkpoint", str(run_dir), "--out", str(run_dir / "export")], "exists; pass --overwrite"),
        (["--pretrained", str(run_dir / "export" / "finetuned.safetensors")], "or --checkpoint RUN_DIR"),
    ]
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    for argv, message in cases:
        assert cli_main(["patch", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before
    assert not (tmp_path / "x").exists()
