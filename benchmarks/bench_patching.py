"""End-of-run export and patching: gather-on-rank-0 (the old way) against sharded (every rank writes its partition).

    python benchmarks/bench_patching.py --models ViT-B-32 ViT-L-14 --stages 1 3     # CPU, 2 ranks, gloo
    clove-dist bench patching --models ViT-B-32 --stages 1

For each (model, ZeRO stage, method) torchrun starts 2 ranks of this script (--worker): each builds the real
DeepSpeed engine over the model (random init, fp32, CPU), then times the export step (finetuned.safetensors plus
one patched alpha 0.6, from a pre-trained file holding the same init) and reads its own memory: VmRSS before the
step and the peak during it (VmHWM, reset just before the step through /proc/self/clear_refs). "extra" is peak
minus before: what the step itself costs on top of the engine. Each method runs in fresh processes, so memory one
method freed cannot hide the other's. Results: benchmarks/results/patching.{csv,md}.

Target (issue: sharded patching): sharded extra per rank <= fp32 model / ranks + largest tensor + 256 MB, and no
rank above 0.5x the gather way's rank 0.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import RESULTS_DIR, append_csv, context_header, machine_context, markdown_table  # noqa: E402

MB = 1 << 20
RANKS = 2


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def gather_export(clip, original_shapes: dict, model_name: str, pretrained: str, alpha: float, out: Path,
                  is_main: bool) -> None:
    """The baseline: the end-of-run export before sharding. Every rank joins a gather of each parameter's fp32
    master copy, rank 0 keeps all of them, rebuilds the pre-trained model and interpolates a whole state dict."""
    from deepspeed.utils import safe_get_full_fp32_param

    from clove_dist import model as cmodel
    from clove_dist.config import ModelConfig
    from clove_dist.patching import interpolate_state, patched_name, save_state
    state = {}
    for name, p in clip.named_parameters():
        value = safe_get_full_fp32_param(p)
        if is_main:
            state[name] = value.float().cpu().clone()
    if not is_main:
        return
    state = cmodel.restore_shapes(state, original_shapes)
    out.mkdir(parents=True, exist_ok=True)
    save_state(state, out / "finetuned.safetensors")
    base = cmodel.create(ModelConfig(name=model_name, pretrained=pretrained))[0]
    pre = {k: v.float() for k, v in base.state_dict().items()}
    save_state(interpolate_state(pre, state, alpha), out / patched_name(alpha))


def worker(model_name: str, stage: int, method: str, work: Path) -> None:
    import torch

    from clove_dist import dist as cdist
    from clove_dist import model as cmodel
    from clove_dist.config import ModelConfig, load_config
    from clove_dist.loss import ContrastiveLoss
    from clove_dist.patching import export_sharded, save_state
    from clove_dist.train import TrainStep, param_groups
    from clove_dist.zero import deepspeed_config

    torch.set_num_threads(1)
    env = cdist.setup("cpu", "gloo")
    import deepspeed
    torch.manual_seed(0)
    clip = cmodel.create(ModelConfig(name=model_name))[0]
    pre = work / f"{model_name}-init.safetensors"
    if env.rank == 0 and not pre.is_file():  # the pre-trained side: the same init, as a file (not measured)
        save_state({k: v.float() for k, v in clip.state_dict().items()}, pre)
    cdist.barrier()
    sizes = [p.numel() * 4 for p in clip.parameters()]
    original_shapes = cmodel.make_deepspeed_safe(clip)
    cfg = load_config(None, [f"distributed.zero_stage={stage}", "data.batch_size=1", "run.device=cpu",
                             f"model.name={model_name}", f"model.pretrained={pre}", "patching.alphas=[0.6]",
                             f"run.output_dir={work}", "run.name=gather"])
    ds_cfg = deepspeed_config(cfg.distributed, cfg.data.batch_size, cfg.optim.grad_clip, torch.device("cpu"))  # the project's engine config (ZeRO-3: threshold 10,000)
    step_module = TrainStep(clip, ContrastiveLoss("chunked", 100.0, 64))
    optimizer = torch.optim.AdamW(param_groups(clip, 0.1), lr=1e-5)
    engine, _, _, _ = deepspeed.initialize(model=step_module, optimizer=optimizer, config=ds_cfg,
                                           dist_init_required=False)
    out = work / f"{method}-{model_name}-z{stage}"
    gc.collect()
    cdist.barrier()
    before = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    t0 = time.perf_counter()
    if method == "gather":
        gather_export(clip, original_shapes, model_name, str(pre), 0.6, out / "export", env.is_main)
    else:
        export_sharded(clip, original_shapes, model_name, str(pre), [0.6], out / "export", seed=0)
    cdist.barrier()
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    result = {"rank": env.rank, "rss_before_mb": before / 1024, "peak_mb": peak / 1024,
              "extra_mb": (peak - before) / 1024, "seconds": seconds,
              "model_mb": sum(sizes) / MB, "largest_tensor_mb": max(sizes) / MB}
    (work / f"result-{method}-{model_name}-z{stage}-r{env.rank}.json").write_text(json.dumps(result))
    cdist.barrier()
    del engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(model_name: str, stage: int, method: str, work: Path, timeout: int) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(RANKS), "--master_port",
           str(_free_port()), str(Path(__file__).resolve()), "--worker", model_name, str(stage), method, str(work)]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{model_name} ZeRO-{stage} {method} failed:\n{proc.stderr[-4000:]}")
    rows = []
    for r in range(RANKS):
        res = json.loads((work / f"result-{method}-{model_name}-z{stage}-r{r}.json").read_text())
        rows.append({"model": model_name, "zero_stage": stage, "method": method, **res})
    for p in work.glob(f"*-{model_name}-z{stage}"):  # outputs are not kept: the disk is small
        subprocess.run(["rm", "-rf", str(p)], check=False)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["model"], r["zero_stage"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for model_name, stage in keys:
        g = [r for r in rows if r["model"] == model_name and r["zero_stage"] == stage and r["method"] == "gather"]
        s = [r for r in rows if r["model"] == model_name and r["zero_stage"] == stage and r["method"] == "sharded"]
        if not g or not s:
            continue
        g0 = next(r for r in g if r["rank"] == 0)
        worst = max(s, key=lambda r: r["peak_mb"])
        budget = g0["model_mb"] / RANKS + g0["largest_tensor_mb"] + 256
        out.append({"model": model_name, "zero": stage, "fp32 model MB": g0["model_mb"],
                    "gather rank0 extra MB": g0["extra_mb"], "sharded max extra MB": max(r["extra_mb"] for r in s),
                    "budget MB": budget, "within budget": max(r["extra_mb"] for r in s) <= budget,
                    "sharded max peak / gather rank0 peak": worst["peak_mb"] / g0["peak_mb"],
                    "gather s": max(r["seconds"] for r in g), "sharded s": max(r["seconds"] for r in s),
                    "time ratio sharded/gather": max(r["seconds"] for r in s) / max(r["seconds"] for r in g)})
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        worker(argv[1], int(argv[2]), argv[3], Path(argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    ap.add_argument("--stages", nargs="+", type=int, default=[1, 3])
    ap.add_argument("--methods", nargs="+", default=["gather", "sharded"])
    ap.add_argument("--work", default="", help="scratch directory (default: a temporary one)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per torchrun launch")
    ap.add_argument("--out", default=str(RESULTS_DIR / "patching"), help="results prefix (.csv, .md)")
    args = ap.parse_args(argv)
    ctx = machine_context("cpu")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(dir=args.work or None) as tmp:
        work = Path(tmp)
        for model_name in args.models:
            for stage in args.stages:
                for method in args.methods:
                    t = time.perf_counter()
                    got = run_config(model_name, stage, method, work, args.timeout)
                    rows += got
                    print(f"{model_name} ZeRO-{stage} {method}: " + ", ".join(
                        f"rank {r['rank']} extra {r['extra_mb']:.0f} MB peak {r['peak_mb']:.0f} MB "
                        f"{r['seconds']:.1f} s" for r in got) + f" (launch {time.perf_counter() - t:.0f} s)",
                        flush=True)
    append_csv(args.out + ".csv", [{**ctx, **r} for r in rows])
    per_rank = markdown_table(rows, ["model", "zero_stage", "method", "rank", "rss_before_mb", "peak_mb",
                                     "extra_mb", "seconds"])
    summary = summarize(rows)
    text = "\n\n".join([
        "# End-of-run export: gather on rank 0 vs sharded", context_header(ctx),
        f"{RANKS} ranks (gloo, CPU), random init in fp32, DeepSpeed engine as clove_dist.train builds it; the step "
        "writes finetuned.safetensors and patched_alpha0.6.safetensors. extra = peak RSS during the step minus RSS "
        "before it (VmHWM reset through /proc/self/clear_refs), per rank, each method in fresh processes.",
        "## Per rank", per_rank, "## Summary", markdown_table(summary, list(summary[0]) if summary else []),
    ]) + "\n"
    Path(args.out + ".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
