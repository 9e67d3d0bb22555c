"""Peak host memory per rank at training start-up, ZeRO-1 against ZeRO-3, as the trainer builds the run.

    python benchmarks/bench_startup.py --model ViT-L-14 --ranks 2          # writes results/startup_memory.{csv,md}

For each stage, `torchrun --nproc_per_node RANKS` runs the trainer's build phase (model, DeepSpeed engine, data
loader; no step) with weights from a local safetensors file of the model's random initialisation, and each rank
reports its peak resident memory (getrusage ru_maxrss) after `deepspeed.initialize`. Under ZeRO-3 the model is
partitioned as it is built and the file is read one tensor at a time (clove_dist.model.create_partitioned); under
ZeRO-1 every rank builds the whole fp32 model first. CPU, gloo, fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import RESULTS_DIR, append_csv, context_header, machine_context, markdown_table  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _rank_main(config_json: str) -> None:
    """Inside one rank: build the trainer and print this rank's peak RSS as JSON."""
    from clove_dist.config import from_dict
    from clove_dist.train import Trainer
    trainer = Trainer(from_dict(json.loads(config_json)))
    trainer.build()
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    params = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.clip.parameters())
    print("STARTUP " + json.dumps({"rank": trainer.env.rank, "peak_gib": peak_gib, "params": params}), flush=True)


def _weights_file(model: str, directory: Path) -> Path:
    import open_clip
    import torch
    from safetensors.torch import save_file
    import clove_dist.model  # noqa: F401  (registers the small architectures)
    path = directory / f"{model}-random.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        state = {k: v.contiguous() for k, v in open_clip.create_model(model).state_dict().items()}
        save_file(state, str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-L-14")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--stages", default="1,3")
    ap.add_argument("--workdir", default="", help="where the weights file and shards go (default: a temp dir)")
    ap.add_argument("--reduce-bucket-size", type=int, default=50_000_000,
                    help="distributed.reduce_bucket_size of both stages (ZeRO-3 allocates its reduce bucket at start-up: "
                         "on CPU it is host memory, on a GPU device memory)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="clove-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    from clove_dist.data.synthetic import write_world
    world = write_world(work / "world", seed=0, num_train=64, samples_per_shard=64, num_eval_per_subset=2,
                        num_zeroshot_per_class=1, image_size=32, progress=False)
    weights = _weights_file(args.model, work)
    rows = []
    ctx = machine_context("cpu")
    for stage in [int(s) for s in args.stages.split(",")]:
        cfg = {"run": {"output_dir": str(work / "runs"), "name": f"zero{stage}", "device": "cpu"},
               "model": {"name": args.model, "pretrained": str(weights)},
               "data": {"train_shards": world.train_pattern, "batch_size": 2, "num_workers": 0},
               "negatives": {"style": "none"}, "checkpoint": {"resume": "none"},
               "distributed": {"zero_stage": stage, "precision": args.precision, "stage3_param_persistence_threshold": 0,
                               "reduce_bucket_size": args.reduce_bucket_size}}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
               "--master_port", str(29000 + stage * 7 + os.getpid() % 500), __file__, "--rank-main", json.dumps(cfg)]
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        for line in proc.stdout.splitlines():
            if line.startswith("STARTUP "):
                r = json.loads(line[8:])
                rows.append({**ctx, "model": args.model, "ranks": args.ranks, "zero_stage": stage,
                             "rank": r["rank"], "params": r["params"], "peak_rss_gib": round(r["peak_gib"], 3),
                             "precision": args.precision, "reduce_bucket_size": args.reduce_bucket_size})
    rows.sort(key=lambda r: (r["zero_stage"], r["rank"]))
    by_stage = {s: max(r["peak_rss_gib"] for r in rows if r["zero_stage"] == s) for s in {r["zero_stage"] for r in rows}}
    table = markdown_table(rows, ["model", "ranks", "precision", "zero_stage", "rank", "params", "peak_rss_gib"])
    summary = ""
    if 1 in by_stage and 3 in by_stage:
        summary = (f"\nHighest rank peak, ZeRO-3 / ZeRO-1: {by_stage[3]:.2f} / {by_stage[1]:.2f} GiB = "
                   f"{by_stage[3] / by_stage[1]:.2f}x (target <= 0.6x)\n")
    print(table + summary)
    if not args.no_save:
        append_csv(RESULTS_DIR / "startup_memory.csv", rows)
        md = RESULTS_DIR / "startup_memory.md"
        md.write_text((md.read_text() + "\n" if md.exists() else "") +
            f"## Start-up memory per rank: ZeRO-1 vs ZeRO-3, {args.precision}\n\n{context_header(ctx)}\n\n"
            f"`python benchmarks/bench_startup.py --model {args.model} --ranks {args.ranks}`: the trainer's build "
            f"phase (model from a local file of random weights, engine, loader), {args.precision}, CPU, gloo, "
            f"reduce_bucket_size {args.reduce_bucket_size:,} elements for both stages (ZeRO-3 allocates its reduce "
            f"bucket at start-up; with DeepSpeed's default of 5e8 fp32 elements that is 2 GB of host memory on CPU, "
            f"device memory on a GPU); peak RSS (ru_maxrss) of each rank after deepspeed.initialize.\n\n{table}\n"
            f"{summary}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rank-main":
        _rank_main(sys.argv[2])
    else:
        raise SystemExit(main())
