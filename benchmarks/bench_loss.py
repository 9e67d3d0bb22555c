"""Contrastive loss with hard negatives: time (forward, backward, both) and peak memory per provider and size.

    python benchmarks/bench_loss.py                                  # quick CPU run (a few minutes)
    python benchmarks/bench_loss.py --batch 8192 --neg-ratio 1 --dim 512 --providers reference chunked gemm \\
        --modes full --repeat 5 --tag _symmetric                    # the CPU target case (loss_cpu_symmetric.md)
    clove-dist bench loss --device cuda                              # on a GPU node: bf16, R = M in 4k..64k,
                                                                     # D in 512/768/1024, every provider

What is measured: the whole CLoVe loss of one rank, `ContrastiveLoss(image, text, logit_scale, negatives)` (image
-> text rows over [T; N], text -> image rows over I), with R = local batch, N = R * neg_ratio negatives, D the
feature width. Providers:
  reference  clove_kernels' oracle: materialised logits, logsumexp and gather (impl="reference")
  open_clip  what open_clip's ClipLoss does (two logits matmuls + F.cross_entropy), with negative text columns
  chunked    pure-torch tiles with online LSE (impl="chunked", --chunk-size)
  triton     the Triton kernels (impl="triton"), fused backward with dK by atomics; on CPU only in the
             interpreter, at --triton-cpu-batch
  triton_det the same with loss.deterministic: two backward kernels, no atomics, one more pass over S
  gemm       the bare products of the one-block structure, torch.matmul on materialised S: I C^T (forward and
             recompute), dS C and dS^T I with C = [T; N]: the hardware limit for this work (4 R x M x D products)

Every case runs in a fresh subprocess, so peak memory is the loss's own: on CPU the growth of peak RSS
(VmHWM, reset through /proc/self/clear_refs) over the resident size once the inputs exist; on CUDA torch.cuda.max_memory_allocated over
the allocation once the inputs exist. A case whose estimated reference footprint exceeds --max-mem-gb is
recorded as skipped, not run. Times are p20/p50/p80 over --repeat runs after --warmup; compare them as ratios
within one run. Results: benchmarks/results/loss_<device>.csv (appended), .md and .png (rewritten).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import RESULTS_DIR, append_csv, context_header, machine_context, markdown_table, time_percentiles  # noqa

PROVIDERS = ("reference", "open_clip", "chunked", "triton", "triton_det", "gemm")
TRITON = ("triton", "triton_det")
MODES = ("forward", "backward", "full")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# --- one case, in its own process ----------------------------------------------------------------------------------

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _open_clip_style(image, text, logit_scale, negatives, max_logit_scale=100.0):
    """open_clip's ClipLoss (logits_per_image = s * I @ T.T, logits_per_text = s * T @ I.T, mean of the two
    cross-entropies), with the negatives appended as extra text columns of the image -> text logits."""
    import torch
    import torch.nn.functional as F
    scale = logit_scale.float().exp().clamp(max=max_logit_scale)
    columns = text if negatives is None else torch.cat([text, negatives])
    labels = torch.arange(image.shape[0], device=image.device)
    logits_per_image = scale * image @ columns.T
    logits_per_text = scale * text @ image.T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _bare_gemms():
    """An autograd op whose forward is S = I C^T and whose backward recomputes S and forms S C and S^T I (S stands
    in for dS): the four products of the one-block loss, with nothing else."""
    import torch

    class BareGemms(torch.autograd.Function):
        @staticmethod
        def forward(ctx, rows, columns):
            ctx.save_for_backward(rows, columns)
            return (rows @ columns.T).sum()

        @staticmethod
        def backward(ctx, grad):
            rows, columns = ctx.saved_tensors
            logits = rows @ columns.T  # (R, M)
            return logits @ columns, logits.T @ rows

    return BareGemms


def run_case(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    from clove_dist.loss import ContrastiveLoss

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])
    gen = torch.Generator(device="cpu").manual_seed(0)

    def features(n):
        x = F.normalize(torch.randn(n, args.dim, generator=gen), dim=1)
        return x.to(device=device, dtype=dtype).requires_grad_(True)

    image, text = features(args.batch), features(args.batch)
    negatives = features(args.num_neg) if args.num_neg else None
    logit_scale = torch.tensor(math.log(1 / 0.07), device=device, requires_grad=True)
    if args.provider == "gemm":
        bare = _bare_gemms()
        columns = torch.cat([text, negatives]).detach() if negatives is not None else text.detach()

        def loss_fn(rows, *_):
            return bare.apply(rows, columns)
    elif args.provider == "open_clip":
        loss_fn = _open_clip_style
    else:
        impl = "triton" if args.provider in TRITON else args.provider
        loss_fn = ContrastiveLoss(impl=impl, chunk_size=args.chunk_size, deterministic=args.provider == "triton_det")
    if args.provider in TRITON:
        import clove_kernels
        assert clove_kernels.resolve_impl("triton", device) == "triton", "triton unavailable for this device"

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    leaves = [t for t in (image, text, negatives, logit_scale) if t is not None]

    def forward():
        return loss_fn(image, text, logit_scale, negatives)

    def full():
        for t in leaves:
            t.grad = None
        forward().backward()

    # Lazy one-time allocations (autograd engine, thread pools, kernel caches) happen on a tiny problem first, so
    # the peak below is the loss's own: one forward + backward at full size.
    tiny = [features(8), features(8), features(8) if negatives is not None else None]
    loss_fn(tiny[0], tiny[1], logit_scale, tiny[2]).backward()
    logit_scale.grad = None
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        full()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        # Import-time peaks exceed small cases, so the peak mark is reset first where the kernel allows it;
        # otherwise the lifetime maximum (ru_maxrss) is the fallback and small cases read high.
        reset = _reset_peak_rss()
        base = _status_kib("VmRSS") * 1024
        full()
        peak = (_status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024 - base
    out = {"peak_mem_mib": max(peak, 0) / 2**20}
    if "forward" in args.modes:
        out["forward"] = time_percentiles(forward, warmup=args.warmup, repeat=args.repeat, sync=sync)
    if "backward" in args.modes:
        loss = forward()
        out["backward"] = time_percentiles(lambda: loss.backward(retain_graph=True), warmup=args.warmup,
                                           repeat=args.repeat, sync=sync)
        del loss
    if "full" in args.modes:
        cpu_times = []

        def timed_full():
            t0 = time.process_time()
            full()
            cpu_times.append((time.process_time() - t0) * 1e3)
        out["full"] = time_percentiles(timed_full, warmup=args.warmup, repeat=args.repeat, sync=sync)
        if not cuda:
            # Process CPU time: on a shared machine wall time also counts the time other processes held the core.
            out["full_cpu_ms"] = sorted(cpu_times[args.warmup:])[len(cpu_times[args.warmup:]) // 2]
    return out


# --- the driver ------------------------------------------------------------------------------------------------

def reference_bytes(batch: int, num_neg: int, itemsize: int = 4) -> int:
    """About what materialised logits need: logits, their scaled copy and their gradient, both directions."""
    return 3 * itemsize * batch * (2 * batch + num_neg)


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def launch(case: dict, args: argparse.Namespace) -> dict:
    """Run one case in a fresh interpreter; returns its measurements or an error status."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_case", json.dumps(case)]
    env = dict(os.environ)
    if case["provider"] in TRITON and case["device"] == "cpu":
        env["TRITON_INTERPRET"] = "1"  # before triton is imported in the child
    if case.get("threads"):
        env["OMP_NUM_THREADS"] = str(case["threads"])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {args.case_timeout}s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": "oom" if "out of memory" in out.stderr.lower() else f"error: {tail[:160]}"}
    result = json.loads(lines[-1])
    result["status"] = "ok"
    return result


def plan(args: argparse.Namespace) -> list[dict]:
    cases = []
    for dim in args.dim:
        for ratio in args.neg_ratio:
            for batch in args.batch:
                for provider in args.providers:
                    if provider in TRITON and args.device == "cpu":
                        continue  # interpreted separately, at one small size
                    cases.append(dict(provider=provider, batch=batch, num_neg=int(batch * ratio), dim=dim))
    if set(TRITON) & set(args.providers) and args.device == "cpu" and args.triton_cpu_batch:
        b = args.triton_cpu_batch
        for provider in args.providers:  # every provider at the interpreter's size, for context
            cases.append(dict(provider=provider, batch=b, num_neg=b, dim=args.triton_cpu_dim, small=True))
    return cases


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="local batch sizes R (default 1024 4096 on CPU; 4096 .. 65536 on CUDA)")
    p.add_argument("--neg-ratio", type=float, nargs="+", default=None,
                   help="negatives N = R * ratio (default 0 1 on CPU; 0 on CUDA, so that M = R)")
    p.add_argument("--dim", type=int, nargs="+", default=None, help="feature widths D (default 512; CUDA 512 768 1024)")
    p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per case (default 1 on CPU: on a shared machine more threads than free "
                        "cores make OpenMP spin and times meaningless; 0 = torch's default)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--triton-cpu-batch", type=int, default=128, help="R (= N) of the interpreted Triton case")
    p.add_argument("--triton-cpu-dim", type=int, default=64)
    p.add_argument("--max-mem-gb", type=float, default=None,
                   help="skip cases whose reference footprint exceeds this (default: 80%% of MemAvailable on CPU)")
    p.add_argument("--case-timeout", type=int, default=1800)
    p.add_argument("--tag", default="", help="suffix of the results files (loss_<device><tag>.*)")
    p.add_argument("--_case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._case:  # child: one case, one JSON line
        case = json.loads(args._case)
        ns = argparse.Namespace(**case)
        print(json.dumps(run_case(ns)), flush=True)
        return 0

    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    cuda_run = args.device == "cuda"
    args.batch = args.batch or ([4096, 8192, 16384, 32768, 65536] if cuda_run else [1024, 4096])
    args.neg_ratio = args.neg_ratio or ([0.0] if cuda_run else [0.0, 1.0])
    args.dim = args.dim or ([512, 768, 1024] if cuda_run else [512])
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("error: --device cuda but CUDA is not available", file=sys.stderr)
            return 2
    limit = (args.max_mem_gb * 2**30 if args.max_mem_gb else
             (0.8 * available_bytes() if args.device == "cpu" else float("inf")))
    ctx = machine_context(args.device)
    rows, table = [], []
    cases = plan(args)
    for i, case in enumerate(cases, 1):
        case.update(device=args.device, dtype=args.dtype, chunk_size=args.chunk_size, repeat=args.repeat,
                    warmup=args.warmup, modes=args.modes, threads=args.threads)
        small = case.pop("small", False)
        itemsize = 2 if args.dtype != "fp32" else 4
        label = f"[{i}/{len(cases)}] {case['provider']} R={case['batch']} N={case['num_neg']} D={case['dim']}"
        if case["provider"] in ("reference", "open_clip") and reference_bytes(case["batch"], case["num_neg"],
                                                                             itemsize) > limit:
            result = {"status": f"skipped: needs ~{reference_bytes(case['batch'], case['num_neg']) / 2**30:.0f} GiB"}
        else:
            t0 = time.time()
            result = launch(case, args)
            label += f" ({time.time() - t0:.0f}s)"
        print(label, result.get("status"), f"peak {result.get('peak_mem_mib', float('nan')):.0f} MiB",
              " ".join(f"{m} {result[m]['p50_ms']:.0f}ms" for m in args.modes if m in result), flush=True)
        base = dict(ctx, provider=case["provider"], batch=case["batch"], num_neg=case["num_neg"], dim=case["dim"],
                    dtype=args.dtype, chunk_size=args.chunk_size, threads=args.threads or "default",
                    note="triton interpreter" if case["provider"] in TRITON and args.device == "cpu" else "")
        entry = dict(provider=case["provider"], R=case["batch"], N=case["num_neg"], D=case["dim"],
                     peak_mib=result.get("peak_mem_mib"), status=result["status"], small=small)
        for mode in args.modes:
            timing = result.get(mode, {})
            rows.append(dict(base, mode=mode, p20_ms=timing.get("p20_ms"), p50_ms=timing.get("p50_ms"),
                             p80_ms=timing.get("p80_ms"), peak_mem_mib=result.get("peak_mem_mib"),
                             status=result["status"]))
            entry[f"{mode}_p50_ms"] = timing.get("p50_ms")
            entry[f"{mode}_p20_p80_ms"] = (f"{timing['p20_ms']:.4g}-{timing['p80_ms']:.4g}" if timing else None)
        if entry.get("full_p50_ms"):
            # The useful work of the one-block loss: 4 products of R x M x D (forward, recompute, dQ, dK).
            work = 8 * case["batch"] * (case["batch"] + case["num_neg"]) * case["dim"]
            entry["full_tflops"] = work / (entry["full_p50_ms"] * 1e-3) / 1e12
            rows[-1]["tflops"] = entry["full_tflops"]
        if "full" in args.modes and args.device == "cpu":
            entry["full_cpu_p50_ms"] = result.get("full_cpu_ms")
            rows[-1]["cpu_p50_ms"] = result.get("full_cpu_ms")
        table.append(entry)

    stem = f"loss_{args.device}{args.tag}"
    append_csv(RESULTS_DIR / f"{stem}.csv", rows)
    md = render_markdown(ctx, args, table)
    (RESULTS_DIR / f"{stem}.md").write_text(md)
    print(md)
    plot(table, args, RESULTS_DIR / f"{stem}.png")
    return 0


def ratios(table: list[dict]) -> list[str]:
    """chunked / reference memory and time at every size where both ran."""
    lines = []
    by_key = {(e["provider"], e["R"], e["N"], e["D"]): e for e in table if e["status"] == "ok"}
    for (provider, r, n, d), e in sorted(by_key.items(), key=lambda kv: kv[0][1:]):
        gemm = by_key.get(("gemm", r, n, d))
        if provider in ("chunked", *TRITON) and gemm and e.get("full_p50_ms") and gemm.get("full_p50_ms"):
            lines.append(f"- {provider} / bare GEMMs at R={r}, N={n}, D={d}: full "
                         f"{e['full_p50_ms'] / gemm['full_p50_ms']:.2f}x")
        det = by_key.get(("triton_det", r, n, d))
        if provider == "triton" and det and e.get("backward_p50_ms") and det.get("backward_p50_ms"):
            lines.append(f"- triton (fused, atomics) / triton_det at R={r}, N={n}, D={d}: backward "
                         f"{e['backward_p50_ms'] / det['backward_p50_ms']:.2f}x")
        ref = by_key.get(("reference", r, n, d))
        if provider == "reference" or ref is None:
            continue
        parts = []
        if e.get("peak_mib") and ref.get("peak_mib"):
            parts.append(f"peak memory {e['peak_mib'] / ref['peak_mib']:.3f}x")
        for mode in ("forward", "backward", "full", "full_cpu"):
            if e.get(f"{mode}_p50_ms") and ref.get(f"{mode}_p50_ms"):
                label = "full (process CPU time)" if mode == "full_cpu" else mode
                parts.append(f"{label} {e[f'{mode}_p50_ms'] / ref[f'{mode}_p50_ms']:.2f}x")
        if parts:
            lines.append(f"- {provider} / reference at R={r}, N={n}, D={d}: " + ", ".join(parts))
    return lines


def render_markdown(ctx: dict, args: argparse.Namespace, table: list[dict]) -> str:
    columns = ["provider", "R", "N", "D", "peak_mib"] + [f"{m}_p50_ms" for m in args.modes] + \
              [f"{m}_p20_p80_ms" for m in args.modes] + \
              (["full_cpu_p50_ms"] if args.device == "cpu" and "full" in args.modes else []) + \
              (["full_tflops"] if "full" in args.modes else []) + ["status"]
    text = [f"# Contrastive loss benchmark ({args.device}, {args.dtype})", "", context_header(ctx), "",
            f"Whole CLoVe loss of one rank (image->text over [T; N], text->image over I), forward + backward; "
            f"chunk size {args.chunk_size}; {args.threads or 'default'} CPU thread(s); {args.repeat} timed runs "
            f"after {args.warmup} warm-up; peak memory is "
            f"the loss's own ({'peak RSS growth' if args.device == 'cpu' else 'max_memory_allocated growth'})."
            + (" full_cpu is the process CPU time of a full step (median): on a shared machine it is steadier than "
               "wall time, which also counts time other processes held the core." if args.device == "cpu" else ""),
            "",
            markdown_table(table, columns), "",
            "full_tflops: 8 R (R + N) D / full time, the useful work of the one-block loss (4 products) for every "
            "provider, so it compares providers on the same work. gemm: those 4 products alone (torch.matmul).", "",
            "Ratios (same run):", ""]
    text += ratios(table) or ["- none (reference did not run next to another provider)"]
    if args.device == "cpu":
        text += ["", "Triton rows on CPU run in Triton's interpreter: they show that the kernels run, their times "
                 "say nothing about GPU speed. GPU rows: not measured in this run (no GPU)."]
    return "\n".join(text) + "\n"


def plot(table: list[dict], args: argparse.Namespace, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {0: "--", 1: "-"}
    for provider in PROVIDERS:
        for d in args.dim:
            for ratio in args.neg_ratio:
                pts = sorted((e["R"], e["peak_mib"], e.get("full_p50_ms")) for e in table
                             if e["provider"] == provider and e["D"] == d and not e["small"]
                             and e["status"] == "ok" and e["N"] == int(e["R"] * ratio))
                if not pts:
                    continue
                negs = "0" if ratio == 0 else ("R" if ratio == 1 else f"{ratio:g}R")
                label = f"{provider} D={d} N={negs}"
                ls = styles.get(int(ratio > 0), "-")
                ax_mem.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", label=label)
                if all(p[2] for p in pts):
                    ax_time.plot([p[0] for p in pts], [p[2] / 1e3 for p in pts], ls, marker="o", label=label)
    for ax, title, unit in ((ax_mem, "peak loss memory", "MiB"), (ax_time, "forward + backward time (p50)", "s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("local batch R")
        ax.set_ylabel(unit)
        ax.set_title(f"{title} ({args.device}, {args.dtype})")
        ax.grid(True, which="both", alpha=0.3)
    ax_mem.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
