"""Offline compile report of every Triton kernel: registers, spills, shared memory, tensor-core dots. No GPU needed.

    clove-dist bench compile                               # all kernels x bf16/fp16/fp32 x configs x sm_90a/sm_80
    python benchmarks/bench_compile.py --dtypes bf16 --archs 90 --kernels block_fwd

Each kernel x dtype x autotune config x target is compiled by Triton for the target (GPUTarget("cuda", 90|80, 32))
and assembled by the ptxas inside the triton wheel (`ptxas -v --gpu-name sm_90a|sm_80`); see
clove_kernels/compile_report.py for what is read and how. fp32 rows are compiled with TF32 dots, the default
(`loss.allow_tf32: true`); the per-direction `ce_*` kernels use IEEE fp32 dots (FMA) by design. `atomics` counts
global atomic instructions in the PTX: the fused backward (`block_bwd_fused`, dK by atomic adds) must have them,
every other kernel none.
Results: benchmarks/results/kernels_compile.md and .csv (rewritten).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import RESULTS_DIR, context_header, machine_context, markdown_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", type=int, nargs="+", default=[90, 80], choices=[90, 80])
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"], choices=["bf16", "fp16", "fp32"])
    p.add_argument("--kernels", nargs="+", default=None, help="kernel names (default: all)")
    p.add_argument("--out", default=str(RESULTS_DIR / "kernels_compile"), help="path stem of the .md and .csv")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("error: unset TRITON_INTERPRET: the compile report needs the GPU kernels, not the interpreter's",
              file=sys.stderr)
        return 2
    from clove_kernels import compile_report

    t0 = time.time()

    def progress(r):
        print(f"{r.kernel:15s} {r.dtype:4s} {r.arch:6s} {r.config:28s} regs {r.registers:3d} spill "
              f"{r.spill_stores:4d}/{r.spill_loads:4d} B smem {r.shared_bytes:6d} tc {r.tensor_core_dots}/{r.dots} "
              f"atomics {r.atomics} {r.status}", flush=True)

    rows = compile_report.compile_all(archs=tuple(args.archs), dtypes=tuple(args.dtypes), kernels=args.kernels,
                                      progress=progress)
    table = [compile_report.as_dict(r) for r in rows]
    ctx = machine_context("cpu")
    stem = Path(args.out)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ctx) + list(table[0]))
        writer.writeheader()
        for row in table:
            writer.writerow(dict(ctx, **row))
    shipped_low = [r for r in rows if r.dtype in ("bf16", "fp16")]
    bad = [r for r in shipped_low if r.problems or r.status != "ok"]
    fp32 = [r for r in rows if r.dtype == "fp32"]
    lines = [
        "# Triton kernels compiled offline: registers, spills, shared memory, tensor cores", "",
        context_header(ctx), "",
        f"{len(rows)} compilations in {time.time() - t0:.0f} s: Triton's compiler for each target, then the ptxas "
        "shipped in the triton wheel (`ptxas -v`). No GPU was used or needed; nothing here is a run-time number. "
        "`tc` = dots lowered to tensor-core instructions (wgmma on sm_90a, mma.sync on sm_80) / all dots; `atomics` = global atomic instructions (`atom.global.*`, `red.global.*`) in the "
        "PTX. fp32 rows: TF32 dots for the block kernels (default `loss.allow_tf32: true`), IEEE FMA for `ce_*`. "
        "Shared-memory limits: sm_90a 232,448 B, sm_80 166,912 B per block.", "",
        "## Verdict for the shipped bf16/fp16 configs", "",
        (f"- all {len(shipped_low)} bf16/fp16 compilations: no spills, every dot on tensor cores, shared memory "
         "within the target's limit" if not bad else
         f"- {len(bad)} of {len(shipped_low)} bf16/fp16 compilations have problems:"),
    ]
    lines += [f"  - {r.kernel} {r.dtype} {r.arch} {r.config}: {'; '.join(r.problems) or r.status}" for r in bad]
    fp32_spill = [r for r in fp32 if r.spill_stores > 0]
    lines += [f"- fp32: {sum(r.all_tensor_core for r in fp32)} of {len(fp32)} compilations on tensor cores (TF32), "
              f"{len(fp32_spill)} with spills"]
    with_atomics = sorted({r.kernel for r in rows if r.atomics > 0})
    fused = [r for r in rows if r.kernel == "block_bwd_fused"]
    lines += [f"- global atomics in the PTX: {', '.join(with_atomics) or 'no kernel'}"
              + (f" ({sum(r.atomics > 0 for r in fused)} of {len(fused)} block_bwd_fused compilations)"
                 if fused else ""), ""]
    columns = ["kernel", "dtype", "precision", "arch", "config", "registers", "spill_stores", "spill_loads",
               "shared_bytes", "tensor_core_dots", "dots", "atomics", "status"]
    lines += ["## Every compilation", "", markdown_table(table, columns), ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines[:13 + len(bad)]))
    print(f"wrote {stem.with_suffix('.md')} and .csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
