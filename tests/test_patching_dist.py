"""Sharded export on 2 gloo ranks with real DeepSpeed engines (ZeRO-0; ZeRO 1, 2, 3 with every parameter
partitioned; ZeRO-3 with small persistent parameters): the files every rank writes in place equal, bit for bit,
what the offline streaming patch makes of the gathered weights; alpha 0 gives the pre-trained weights, alpha 1
the fine-tuned export; the rank-0 streaming fallback (forced, and detected for a directory that is not shared),
the random-init path, an interrupted export and `clove-dist patch|export` of the 2-rank checkpoint agree with it.

Run as a script by torchrun (see the `runs` fixture), this file is the worker of each rank.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from launch import torchrun
import torch

STEPS = 2
VARIANTS = ["0", "1", "2", "3", "3p"]
ALPHAS = [0.0, 0.6, 1.0]


def worker(variant: str, root: Path) -> None:
    """variant: the ZeRO stage, "3" with every parameter partitioned, "3p" with the project's persistence
    threshold (small parameters stay whole on every rank besides their fp32 partition)."""
    stage = int(variant[0])
    from clove_dist import dist as cdist
    from clove_dist import model as cmodel
    from clove_dist.config import ModelConfig, load_config
    from clove_dist.loss import ContrastiveLoss
    from clove_dist.patching import export_sharded, save_state
    from clove_dist.patching import sharded as sharded_mod
    from clove_dist.train import TrainStep, param_groups
    from clove_dist.zero import deepspeed_config

    env = cdist.setup("cpu", "gloo")
    import deepspeed
    torch.manual_seed(0)
    clip = cmodel.create(ModelConfig(name="clove-micro"))[0]
    if env.rank == 0:  # the weights training starts from, as a pre-trained file
        save_state({k: v.float() for k, v in clip.state_dict().items()}, root / "pre.safetensors")
    cdist.barrier()
    original_shapes = cmodel.make_deepspeed_safe(clip)
    cfg = load_config(None, [f"distributed.zero_stage={stage}", "data.batch_size=4", "run.device=cpu",
                                "distributed.precision=fp32"])
    ds_cfg = deepspeed_config(cfg.distributed, cfg.data.batch_size, cfg.optim.grad_clip, torch.device("cpu"))
    if variant == "3":
        ds_cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition every parameter
    step_module = TrainStep(clip, ContrastiveLoss("chunked", 100.0, 64))
    optimizer = torch.optim.AdamW(param_groups(clip, 0.1), lr=1e-2)
    engine, _, _, _ = deepspeed.initialize(model=step_module, optimizer=optimizer, config=ds_cfg,
                                           dist_init_required=False)
    gen = torch.Generator().manual_seed(100 + env.rank)
    for _ in range(STEPS):
        images = torch.randn(4, 3, 32, 32, generator=gen)
        texts = torch.randint(1, 49408, (4, 16), generator=gen)
        negatives = torch.randint(1, 49408, (2, 16), generator=gen)
        loss, _, _ = engine(images, texts, negatives, torch.tensor([True, env.rank == 0]), torch.tensor([0, 1]))
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(root / "checkpoints"), tag="final")
    cdist.barrier()
    if env.rank == 0 and stage > 0:  # DeepSpeed's: .bin (ZeRO-1), sharded (ZeRO-2), one safetensors (ZeRO-3)
        from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict
        convert_zero_checkpoint_to_fp32_state_dict(str(root / "checkpoints"), str(root / "zero_to_fp32"),
                                                   max_shard_size="2MB" if stage == 2 else "5GB",
                                                   safe_serialization=stage > 1, tag="final")

    # the oracle: every parameter's full fp32 master copy, gathered by DeepSpeed's own API
    from deepspeed.utils import safe_get_full_fp32_param
    reference = {}
    for name, p in clip.named_parameters():
        value = safe_get_full_fp32_param(p)  # a collective under ZeRO-3: every rank calls it
        value = p.detach() if value is None else value  # ZeRO-0: the model holds the fp32 weights itself
        shape = original_shapes.get(name, getattr(p, "ds_shape", p.shape))
        reference[name] = value.detach().cpu().reshape(shape).clone()
    if env.is_main:
        save_state(reference, root / "gathered.safetensors")
    del reference
    pre = str(root / "pre.safetensors")
    sharded_mod.CHUNK_NUMEL = 100_003  # odd-sized chunks inside fragments: chunking must not change a bit
    export_sharded(clip, original_shapes, "clove-micro", pre, ALPHAS, root / "sharded", seed=0)
    export_sharded(clip, original_shapes, "clove-micro", pre, ALPHAS, root / "streamed", seed=0,
                   force_streaming=True)
    export_sharded(clip, original_shapes, "clove-micro", None, [0.0], root / "randinit", seed=0)
    # a directory that is not shared: each rank names its own, as ranks on different machines with node-local
    # disks would see one path; the export must notice and stream through rank 0 into rank 0's
    export_sharded(clip, original_shapes, "clove-micro", pre, ALPHAS, root / f"local{env.rank}", seed=0)

    # An export that dies part-way (after `fail_after` byte ranges, on every rank or on rank 1 alone) leaves no
    # final file; the next export into the same directory completes.
    from clove_dist.patching import PatchError
    real = sharded_mod._pwrite_all
    cases = [((0, 1), 0), ((0, 1), 7), ((1,), 3)]
    cases = cases if stage > 0 else cases[:2]  # under ZeRO-0 rank 1 writes nothing, so it cannot fail alone
    for case, (failing_ranks, fail_after) in enumerate(cases):
        calls, fired = [0], [False]

        def failing(fd, tensor, offset, calls=calls, fired=fired, fail_after=fail_after):
            if calls[0] >= fail_after:
                fired[0] = True
                raise KeyboardInterrupt("simulated interruption")
            calls[0] += 1
            real(fd, tensor, offset)

        if env.rank in failing_ranks:
            sharded_mod._pwrite_all = failing
        try:
            export_sharded(clip, original_shapes, "clove-micro", pre, ALPHAS, root / "interrupted", seed=0)
            raise AssertionError("the interrupted export did not fail")
        except KeyboardInterrupt:
            assert fired[0]
        except PatchError as e:  # a rank that finished its part (or had none, ZeRO-0 rank 1) learns of the failure
            assert not fired[0] and "failed on another rank" in str(e)
        finally:
            sharded_mod._pwrite_all = real
        if env.rank == 0:
            left = sorted(p.name for p in (root / "interrupted").glob("*.safetensors"))
            (root / f"interrupted_{case}.txt").write_text("\n".join(left))
        cdist.barrier()
    export_sharded(clip, original_shapes, "clove-micro", pre, ALPHAS, root / "interrupted", seed=0)
    cdist.barrier()


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
    raise SystemExit(0)


pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for stage in VARIANTS:
        root = tmp_path_factory.mktemp(f"zero{stage}")
        torchrun(2, str(Path(__file__).resolve()), stage, str(root), timeout=400)
        out[stage] = root
    return out


def _load(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def _assert_bitwise(a: dict, b: dict) -> None:
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (k, a[k].shape, b[k].shape)
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("stage", VARIANTS)
def test_sharded_export_equals_gather_and_offline_patch(runs, stage, tmp_path):
    from clove_dist.patching import patch_files, patched_name
    root = runs[stage]
    pre, gathered = _load(root / "pre.safetensors"), _load(root / "gathered.safetensors")
    finetuned = _load(root / "sharded" / "finetuned.safetensors")
    _assert_bitwise(finetuned, gathered)
    assert finetuned["logit_scale"].shape == torch.Size([])  # back to open_clip's 0-dim shape
    assert any(not torch.equal(finetuned[k], pre[k]) for k in pre)  # training moved the weights
    for alpha in ALPHAS:
        got = _load(root / "sharded" / patched_name(alpha))
        offline = patch_files(str(root / "pre.safetensors"), str(root / "gathered.safetensors"), alpha,
                              str(tmp_path / f"offline{alpha}.safetensors"), progress=False)
        _assert_bitwise(got, _load(offline))
        _assert_bitwise(got, _load(root / "streamed" / patched_name(alpha)))  # the rank-0 streaming fallback
        if alpha == 0.0:
            _assert_bitwise(got, pre)
        if alpha == 1.0:
            _assert_bitwise(got, finetuned)
    _assert_bitwise(_load(root / "streamed" / "finetuned.safetensors"), finetuned)
    for name in ["finetuned.safetensors", *(patched_name(a) for a in ALPHAS)]:
        _assert_bitwise(_load(root / "local0" / name), _load(root / "sharded" / name))
    assert not (root / "local1").exists()  # rank 1 wrote nothing: rank 0 streamed everything
    # no pre-trained file: the seeded init training started from is rebuilt, and the hidden copy is removed
    _assert_bitwise(_load(root / "randinit" / patched_name(0.0)), pre)
    assert sorted(p.name for p in (root / "randinit").iterdir()) == [
        "finetuned.safetensors", "open_clip_config.json", patched_name(0.0)]


@pytest.mark.parametrize("stage", ["1", "3"])
def test_interrupted_export_leaves_no_file_and_rerun_completes(runs, stage):
    from clove_dist.patching import patched_name
    root = runs[stage]
    for case in range(3):
        assert (root / f"interrupted_{case}.txt").read_text() == ""
    for name in ["finetuned.safetensors", *(patched_name(a) for a in ALPHAS)]:
        _assert_bitwise(_load(root / "interrupted" / name), _load(root / "sharded" / name))
    assert not list((root / "interrupted").glob("*.partial"))


@pytest.mark.parametrize("stage", VARIANTS)
def test_offline_patch_and_export_of_two_rank_checkpoint(runs, stage, tmp_path):
    from clove_dist.cli import main as cli_main
    from clove_dist.patching import patched_name
    root = runs[stage]
    ckpt = root / "checkpoints" / "final"
    assert cli_main(["export", str(ckpt), "--out", str(tmp_path / "f.safetensors")]) == 0
    _assert_bitwise(_load(tmp_path / "f.safetensors"), _load(root / "sharded" / "finetuned.safetensors"))
    # a run directory, or its checkpoints/ directory: the tag `latest` names
    finetuned = root if stage == "1" else root / "checkpoints"
    assert cli_main(["patch", "--pretrained", str(root / "pre.safetensors"), "--finetuned", str(finetuned),
                     "--alpha", "0.6", "--out", str(tmp_path / "p.safetensors")]) == 0
    _assert_bitwise(_load(tmp_path / "p.safetensors"), _load(root / "sharded" / patched_name(0.6)))
    import open_clip
    import clove_dist.model  # noqa: F401  (registers clove-micro)
    model = open_clip.create_model("clove-micro", pretrained=str(tmp_path / "p.safetensors"))
    assert model.logit_scale.shape == torch.Size([])
    if stage == "0":
        return  # zero_to_fp32 is for ZeRO checkpoints only
    # DeepSpeed's zero_to_fp32 output (`clip.` prefix, [1]-shaped logit_scale) exports to the same weights
    assert cli_main(["export", str(root / "zero_to_fp32"), "--out", str(tmp_path / "z.safetensors")]) == 0
    _assert_bitwise(_load(tmp_path / "z.safetensors"), _load(root / "sharded" / "finetuned.safetensors"))
    if stage == "2":
        assert len(list((root / "zero_to_fp32").glob("*.safetensors"))) > 1  # the sharded index was read
