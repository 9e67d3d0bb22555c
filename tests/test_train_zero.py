"""ZeRO as users run it: 2 ranks, every parameter partitioned under ZeRO-3 (persistence threshold 0), bf16 and fp32.

Each test starts one torchrun whose ranks run several trainings in a row (tests/scripts/train_many.py): the real
`clove_dist.train.main` with real DeepSpeed engines on gloo."""
from __future__ import annotations

import json
import math

import clove_dist.model  # noqa: F401  (registers clove-micro with open_clip)
import open_clip
import pytest
import torch
from launch import torchrun, train_args
from safetensors.torch import load_file

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

CEILING = math.log(100.0)
MODES = [(stage, precision) for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16")]


def _run_many(tmp_path, runs: list) -> None:
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps(runs))
    torchrun(2, "tests/scripts/train_many.py", str(spec), timeout=900)


def _records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_clamp_holds_in_every_stage_and_precision(world, tmp_path):
    """Start above the ceiling (OpenAI's weights start exactly at it and the first step can go up): the fp32 master
    copy must come down to log(100) on every rank's partition and stay there, in every ZeRO stage and precision.
    Without a clamp of the master copy logit_scale stays near its start, log(100) + 0.5, and the test fails."""
    model = open_clip.create_model("clove-micro")
    with torch.no_grad():
        model.logit_scale.fill_(CEILING + 0.5)
    start = tmp_path / "start.pt"
    torch.save(model.state_dict(), start)
    runs = [["--set", "train.max_steps=2", "--set", f"model.pretrained={start}", "--set", "optim.lr=1e-3",
             "--set", f"distributed.zero_stage={stage}",
             "--set", f"distributed.precision={precision}", "--set", f"run.name=s{stage}_{precision}",
             "--set", "distributed.stage3_param_persistence_threshold=0"] for stage, precision in MODES]
    _run_many(tmp_path, [train_args(world, tmp_path, *r) for r in runs])
    for stage, precision in MODES:
        run = tmp_path / f"s{stage}_{precision}"
        state = load_file(str(run / "export" / "finetuned.safetensors"))
        # the exported value is the fp32 master copy: clamped exactly to the ceiling (fp32 rounding of log(100))
        assert float(state["logit_scale"]) <= CEILING + 1e-6, (stage, precision, float(state["logit_scale"]))
        steps = [r for r in _records(run) if "event" not in r]
        assert max(r["logit_scale"] for r in steps) <= 100.0 * (1 + 1e-2), (stage, precision)  # bf16 copy: 2^-8
        if precision == "bf16":
            # the export is the fp32 master, not the bf16 working copy: an Adam step of ~1e-3 on bf16-rounded
            # weights leaves values no bf16 number equals
            w = state["visual.transformer.resblocks.0.mlp.c_fc.weight"]
            assert not torch.equal(w, w.to(torch.bfloat16).float()), (stage, "export is bf16-rounded")


def test_every_stage_reaches_the_same_weights(world, tmp_path):
    """ZeRO 0/1/2/3 with every parameter partitioned: the same data and seed give the same weights after 2 steps,
    and after a checkpoint at step 2 and a resume to step 4. The weights come from a local file, which ZeRO-3 loads
    tensor by tensor into a model partitioned as it is built (zero.Init): the other stages load it whole."""
    start = tmp_path / "start.pt"
    torch.save(open_clip.create_model("clove-micro").state_dict(), start)
    runs: list = []
    for stage in (0, 1, 2, 3):
        common = ["--set", f"model.pretrained={start}",
                  "--set", f"distributed.zero_stage={stage}", "--set", "distributed.stage3_param_persistence_threshold=0",
                  "--set", f"run.name=z{stage}", "--set", "checkpoint.every_steps=2"]
        runs.append(train_args(world, tmp_path, *common, "--set", "train.max_steps=2"))
        runs.append({"copy": [str(tmp_path / f"z{stage}" / "export" / "finetuned.safetensors"),
                              str(tmp_path / f"z{stage}_step2.safetensors")]})
        runs.append(train_args(world, tmp_path, *common, "--set", "train.max_steps=4"))
    _run_many(tmp_path, runs)
    for name in ("_step2.safetensors", "/export/finetuned.safetensors"):
        ref = load_file(str(tmp_path / f"z0{name}"))
        for stage in (1, 2, 3):
            other = load_file(str(tmp_path / f"z{stage}{name}"))
            assert other.keys() == ref.keys()
            for k in ref:
                # fp32 sums of the same numbers in another order (bucketed all-reduce vs reduce-scatter) differ by
                # a few ulps per step; 4 Adam steps of lr 5e-4 keep that far below 1e-5
                torch.testing.assert_close(other[k], ref[k], rtol=1e-4, atol=1e-5, msg=f"stage {stage} {name} {k}")
    for stage in (0, 1, 2, 3):
        records = _records(tmp_path / f"z{stage}")
        assert [r["step"] for r in records if "event" not in r] == [1, 2, 3, 4]
        assert [(r["event"], r["step"]) for r in records if "event" in r] == [("resumed", 2)]


def test_two_ranks_evaluate_during_training_and_report(world, tmp_path):
    """eval.every_steps on 2 ranks: rank 0 evaluates the gathered weights while the other waits without a
    collective; every metric goes to metrics.jsonl and TensorBoard (read back from the event file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    args = train_args(world, tmp_path, "--set", "train.max_steps=4", "--set", "eval.every_steps=2",
                      "--set", f"eval.sugarcrepe_dir={world.sugarcrepe_dir}", "--set", "eval.batch_size=16",
                      "--set", f"eval.retrieval_dir={world.retrieval_dir}", "--set", "negatives.style=both",
                      "--set", "run.report_to=[jsonl, tensorboard]", "--set", "distributed.zero_stage=3",
                      "--set", "distributed.stage3_param_persistence_threshold=0")
    _run_many(tmp_path, [args])
    run = tmp_path / "debug"
    assert sorted(p.name for p in (run / "eval").glob("step_*.json")) == ["step_00000002.json",
                                                                        "step_00000004.json"]
    # the end-of-run evaluation of the exports, by rank 0 while rank 1 waited for it on the store
    assert sorted(json.loads((run / "eval.json").read_text())) == ["finetuned.safetensors"]
    records = _records(run)
    steps = [r for r in records if "event" not in r and "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        # the two directions average to the loss; the watch metrics are there
        assert (r["loss_i2t"] + r["loss_t2i"]) / 2 == pytest.approx(r["loss"], rel=1e-4)
        assert {"data_wait_s", "compute_s", "samples_per_s_per_device", "lr", "logit_scale"} <= r.keys()
    assert any("neg_acc" in r and 0 <= r["neg_acc"] <= 1 for r in steps)  # swaps exist for the shape captions
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [2, 4]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert any(t.startswith("eval/") for t in tags)
    logged = {r["step"]: r["loss"] for r in steps}
    for e in acc.Scalars("train/loss"):
        assert e.value == pytest.approx(logged[e.step], rel=1e-6)  # float32 in the event file


def test_resnet_batchnorm_under_zero3_exports_trained_buffers(world, tmp_path):
    """The demo's clove-tiny-rn (open_clip's ModifiedResNet: BatchNorm running statistics are buffers, which ZeRO
    does not partition, and num_batches_tracked is an int64) on 2 ranks, every parameter partitioned, patched on
    the ranks at the end: both exports load into open_clip with the trained statistics, and the patched file
    interpolates the floating tensors and keeps the step count an integer."""
    start = tmp_path / "start.pt"
    init = open_clip.create_model("clove-tiny-rn").state_dict()
    torch.save(init, start)
    _run_many(tmp_path, [train_args(
        world, tmp_path, "--set", "model.name=clove-tiny-rn", "--set", f"model.pretrained={start}",
        "--set", "distributed.zero_stage=3", "--set", "distributed.stage3_param_persistence_threshold=0",
        "--set", "train.max_steps=2", "--set", "patching.alphas=[0.5]")])
    export = tmp_path / "debug" / "export"
    fine = load_file(str(export / "finetuned.safetensors"))
    patched = load_file(str(export / "patched_alpha0.5.safetensors"))
    assert fine.keys() == patched.keys() == init.keys()
    bn = "visual.bn1.running_var"
    assert not torch.allclose(fine[bn], init[bn])  # the statistics of the 2 training steps, not the initial ones
    assert fine["visual.bn1.num_batches_tracked"].item() == 2
    assert patched["visual.bn1.num_batches_tracked"].dtype == torch.int64
    for k in (bn, "visual.layer1.0.conv1.weight", "text_projection"):
        # fp32 lerp of the same fp32 numbers: the sharded patch and this one round alike to a few ulps
        torch.testing.assert_close(patched[k], (init[k].float() + fine[k]) / 2, rtol=1e-6, atol=1e-6, msg=k)
    for name in ("finetuned.safetensors", "patched_alpha0.5.safetensors"):
        model = open_clip.create_model("clove-tiny-rn", pretrained=str(export / name))  # what a user does
        assert torch.equal(model.state_dict()[bn], load_file(str(export / name))[bn])
