"""Evaluation during training: rank 0 evaluates gathered weights, the other rank waits on the file system."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from clove_dist.config import from_dict
from clove_dist.data.synthetic import write_world
from clove_dist.eval import evaluate_all, headline_metrics
from clove_dist.eval.in_training import EvaluationFailed, TrainingEvaluator
from test_eval import id_preprocess, table_sugarcrepe  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("intrain"), seed=4, num_train=1, samples_per_shard=20,
                       num_eval_per_subset=4, num_zeroshot_per_class=1, num_retrieval_images=12,
                       num_aro_per_subset=4, image_size=32, progress=False)


def _cfg(world, **extra):
    return from_dict({"eval": {"sugarcrepe_dir": world.sugarcrepe_dir, "zeroshot_dir": world.zeroshot_dir,
                               "retrieval_dir": world.retrieval_dir, "aro_dir": world.aro_dir,
                               "every_steps": 5, "batch_size": 16, **extra}})


def _weights(seed: int) -> dict[str, torch.Tensor]:
    from clove_dist import model as cmodel
    from clove_dist.config import ModelConfig
    torch.manual_seed(seed)
    clip, *_ = cmodel.create(ModelConfig(name="clove-micro"), "cpu")
    return {k: v.detach().clone() for k, v in clip.state_dict().items()}


def _rank(rank: int, world_size: int, port: int, eval_cfg, run_dir: str, out: str, fail: bool) -> None:
    sharded = eval_cfg.sharded
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    evaluator = TrainingEvaluator(eval_cfg, "clove-micro", run_dir, "cpu", poll_s=0.05)
    evaluator.forget_after(0, rank == 0)
    dist.barrier()  # the training steps between forget_after and the first evaluation
    results = {}
    for step in range(1, 11):
        if not evaluator.due(step):
            continue
        # What full_state_dict gives each rank: keep=is_main, or keep=True on every rank when sharded.
        state = _weights(step) if rank == 0 or sharded else None
        if fail and rank == 0:
            state = {"not": torch.zeros(1)}
        try:
            results[step] = evaluator.run(step, state, is_main=rank == 0)
        except (EvaluationFailed, RuntimeError) as e:
            results[step] = f"{type(e).__name__}: {e}"
            break
        t = torch.tensor([float(step)])
        dist.all_reduce(t)  # both ranks continue training together after each evaluation
    Path(out.format(rank=rank)).write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.mark.multiproc
@pytest.mark.slow
def test_two_ranks_get_rank0_results_without_a_collective(tmp_path, world):
    cfg = _cfg(world)
    out = str(tmp_path / "rank{rank}.json")
    stale = tmp_path / "run" / "eval" / "step_00000005.error"
    stale.parent.mkdir(parents=True)
    stale.write_text("RuntimeError: left by a preempted attempt\n")  # forget_after must clear it
    mp.spawn(_rank, args=(2, 29561, cfg.eval, str(tmp_path / "run"), out, False), nprocs=2, join=True)
    r0, r1 = (json.loads(Path(out.format(rank=r)).read_text()) for r in (0, 1))
    assert r0 == r1 and set(r0) == {"5", "10"}
    assert {"eval/sugarcrepe_average", "eval/zeroshot_top1", "eval/retrieval_t2i_R@1", "eval/aro_vg_relation",
            "eval/aro_coco_order"} <= set(r0["5"])
    # Rank 0's numbers are those of evaluating the same weights directly.
    from clove_dist import model as cmodel
    from clove_dist.config import ModelConfig
    clip, _, preprocess, tokenizer = cmodel.create(ModelConfig(name="clove-micro"), "cpu")
    clip.load_state_dict(_weights(10))
    e = cfg.eval
    direct = headline_metrics(evaluate_all(clip, preprocess, tokenizer, sugarcrepe_dir=e.sugarcrepe_dir,
                                           zeroshot_dir=e.zeroshot_dir, retrieval_dir=e.retrieval_dir,
                                           aro_dir=e.aro_dir, batch_size=16))
    assert r0["10"] == pytest.approx(direct, abs=1e-6)  # same fp32 computation, same batches
    saved = json.loads((tmp_path / "run" / "eval" / "step_00000010.json").read_text())
    assert saved["step"] == 10 and "aro" in saved and not stale.exists()


@pytest.mark.multiproc
def test_a_failure_on_rank0_reaches_the_waiting_rank(tmp_path, world):
    out = str(tmp_path / "rank{rank}.json")
    mp.spawn(_rank, args=(2, 29562, _cfg(world).eval, str(tmp_path / "run"), out, True), nprocs=2, join=True)
    r0, r1 = (json.loads(Path(out.format(rank=r)).read_text()) for r in (0, 1))
    assert r0["5"].startswith("RuntimeError") and "does not match" in r0["5"]
    assert r1["5"].startswith("EvaluationFailed: evaluation at step 5 failed on rank 0") and "does not match" in r1["5"]


def test_waiting_rank_times_out_with_one_line(tmp_path, world):
    ev = TrainingEvaluator(_cfg(world).eval, "clove-micro", tmp_path, "cpu", poll_s=0.01)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="waited 0 s for rank 0's evaluation at step 5"):
        ev.run(5, None, is_main=False, timeout_s=0.2)
    assert time.monotonic() - t0 < 5


def test_due_and_enabled(world):
    ev = TrainingEvaluator(_cfg(world).eval, "clove-micro", "/tmp/x", "cpu")
    assert [s for s in range(0, 16) if ev.due(s)] == [5, 10, 15]
    off = TrainingEvaluator(_cfg(world, every_steps=0).eval, "clove-micro", "/tmp/x", "cpu")
    assert not off.enabled and not off.due(5)
    none = TrainingEvaluator(from_dict({"eval": {"every_steps": 5}}).eval, "clove-micro", "/tmp/x", "cpu")
    assert not none.enabled


@pytest.mark.multiproc
@pytest.mark.slow
def test_sharded_evaluation_equals_a_single_process_one(tmp_path, world):
    cfg = _cfg(world, sharded=True)
    out = str(tmp_path / "rank{rank}.json")
    mp.spawn(_rank, args=(2, 29563, cfg.eval, str(tmp_path / "run"), out, False), nprocs=2, join=True)
    r0, r1 = (json.loads(Path(out.format(rank=r)).read_text()) for r in (0, 1))
    assert r0 == r1 and set(r0) == {"5", "10"}
    saved = json.loads((tmp_path / "run" / "eval" / "step_00000005.json").read_text())
    assert saved["num_ranks"] == 2
    from clove_dist import model as cmodel
    from clove_dist.config import ModelConfig
    clip, _, preprocess, tokenizer = cmodel.create(ModelConfig(name="clove-micro"), "cpu")
    clip.load_state_dict(_weights(5))
    e = cfg.eval
    direct = evaluate_all(clip, preprocess, tokenizer, sugarcrepe_dir=e.sugarcrepe_dir, zeroshot_dir=e.zeroshot_dir,
                          retrieval_dir=e.retrieval_dir, aro_dir=e.aro_dir, batch_size=16)
    # Each rank encodes other batches than one process does; fp32 features agree to ~1e-6, so every count-based
    # metric is the same unless a comparison is closer than that (checked: the values are equal here).
    assert r0["5"] == pytest.approx(headline_metrics(direct), abs=1e-6)
    for name in ("sugarcrepe", "zeroshot", "retrieval"):
        counts = {k: v for k, v in direct[name].items() if k.startswith("num_")}
        assert {k: saved[name][k] for k in counts} == counts
    assert saved["aro"]["coco_order"]["num_evaluated"] == direct["aro"]["coco_order"]["num_evaluated"]


def _sharded_sugarcrepe(rank: int, port: int, root: str, model, tokenizer, out: str) -> None:
    from clove_dist.eval import sugarcrepe
    from clove_dist.eval.sharding import Shard
    from test_eval import id_preprocess
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    res = sugarcrepe.evaluate(model, id_preprocess, tokenizer, root, batch_size=2, shard=Shard.current())
    Path(out.format(rank=rank)).write_text(json.dumps({"average": res["average"], "counts": res["counts"],
                                                       "encoded": model.num_images_encoded}))
    dist.destroy_process_group()


@pytest.mark.multiproc
def test_each_rank_encodes_its_share_and_gets_the_whole_result(tmp_path, table_sugarcrepe):
    from clove_dist.eval import sugarcrepe
    root, model, tokenizer, _ = table_sugarcrepe
    whole = sugarcrepe.evaluate(model, id_preprocess, tokenizer, root, batch_size=2)
    num_images = model.num_images_encoded
    model.num_images_encoded = 0
    out = str(tmp_path / "rank{rank}.json")
    mp.spawn(_sharded_sugarcrepe, args=(29564, str(root), model, tokenizer, out), nprocs=2, join=True)
    r0, r1 = (json.loads(Path(out.format(rank=r)).read_text()) for r in (0, 1))
    assert r0["average"] == r1["average"] == whole["average"] and r0["counts"] == whole["counts"]
    assert r0["encoded"] + r1["encoded"] == num_images and abs(r0["encoded"] - r1["encoded"]) <= 1
