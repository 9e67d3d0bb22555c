"""Compile the Triton kernels for GPUs that are not here, and read what the hardware would run.

    from clove_kernels.compile_report import compile_all
    rows = compile_all(archs=(90, 80), dtypes=("bf16", "fp16", "fp32"))

For every kernel x dtype x autotune config x target: `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch,
32))` gives TTGIR and PTX without a GPU; the `ptxas` shipped inside the triton wheel (`ptxas -v --gpu-name sm_90a`)
assembles the PTX and reports registers, spill stores/loads and shared memory. A dot ran on tensor cores when the
TTGIR lowered it to `ttng.warp_group_dot` (wgmma, sm_90a) or to a `tt.dot` with an `#mma` result layout (mma.sync,
sm_80); an fp32 dot with IEEE precision stays on `#blocked` layouts (FMA loops). Atomics are counted in the PTX
(`atom.*` / `red.*`, any state space): the fused backward adds dK with global ones, no other kernel may have any.

Arguments are specialised as at run time on CUDA: pointers and D-like sizes and strides divisible by 16.
The kernels must have been imported without TRITON_INTERPRET (the interpreter ships one small config only).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Per-block shared memory a kernel may use (opt-in maximum): H100/H200 227 KiB, A100 163 KiB.
SHARED_LIMIT = {90: 232448, 80: 166912}
GPU_NAME = {90: "sm_90a", 80: "sm_80"}
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
# Scalars that are multiples of 16 at run time for CLIP widths (D = 512..1024, unit-stride rows).
DIVISIBLE_INTS = {"D", "stride_qm", "stride_km", "stride_qd", "stride_kd", "stride_dqm", "stride_dkm"}


@dataclass
class CompileResult:
    kernel: str
    dtype: str
    precision: str
    arch: str
    config: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    shared_limit: int
    dots: int
    tensor_core_dots: int
    atomics: int  # atomic / reduction instructions in the PTX (red.*, atom.*)
    status: str

    @property
    def all_tensor_core(self) -> bool:
        return self.dots > 0 and self.tensor_core_dots == self.dots

    @property
    def problems(self) -> list[str]:
        out = []
        if self.spill_stores or self.spill_loads:
            out.append(f"spills {self.spill_stores}/{self.spill_loads} B")
        if not self.all_tensor_core:
            out.append(f"{self.dots - self.tensor_core_dots} of {self.dots} dots not on tensor cores")
        if self.shared_bytes > self.shared_limit:
            out.append(f"shared {self.shared_bytes} B > {self.shared_limit} B")
        return out


def ptxas_path() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(path):
        raise FileNotFoundError(f"ptxas not found in the triton wheel at {path}")
    return path


def shipped_kernels() -> dict[str, object]:
    """name -> autotuned kernel, every Triton kernel clove_kernels launches."""
    from . import block_triton, contrastive
    if contrastive.INTERPRETED:
        raise RuntimeError("compile reports need the kernels imported without TRITON_INTERPRET=1")
    return {
        "block_fwd": block_triton._block_fwd_kernel,
        "block_bwd_dq": block_triton._block_bwd_dq_kernel,
        "block_bwd_dk": block_triton._block_bwd_dk_kernel,
        "block_bwd_fused": block_triton._block_bwd_fused_kernel,
        "ce_fwd": contrastive._contrastive_fwd_kernel,
        "ce_bwd_dq": contrastive._contrastive_bwd_dq_kernel,
        "ce_bwd_dk": contrastive._contrastive_bwd_dk_kernel,
    }


def _fixed_constexprs(name: str) -> dict[str, int]:
    """Constexprs the host passes besides the autotuned ones (block kernels fix BLOCK_M / BLOCK_N)."""
    if name.startswith("block"):
        from . import block_triton
        return {"BLOCK_M": block_triton.BLOCK_M, "BLOCK_N": block_triton.BLOCK_N}
    return {}


def _signature(jit, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    signature, attrs = {}, {}
    for i, name in enumerate(jit.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            kind = {"q_ptr": DTYPES[dtype], "k_ptr": DTYPES[dtype], "targets_ptr": "i64", "mask_ptr": "i8"}
            signature[name] = "*" + kind.get(name, "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name in DIVISIBLE_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


_DOT = re.compile(r"=\s*(tt\.dot|ttng\.warp_group_dot)\b.*")


def count_dots(ttgir: str) -> tuple[int, int]:
    """(dots, dots on tensor cores) in a TTGIR module."""
    dots = tensor_core = 0
    for line in ttgir.splitlines():
        m = _DOT.search(line)
        if not m:
            continue
        dots += 1
        result_type = line.rsplit("->", 1)[-1]
        if m.group(1) == "ttng.warp_group_dot" or "#mma" in result_type:
            tensor_core += 1
    return dots, tensor_core


_ATOMIC = re.compile(r"^\s*(@!?%p\d+\s+)?(red|atom)\.", re.MULTILINE)


def count_atomics(ptx: str) -> int:
    """Atomic instructions in PTX, any state space: `red.global.add.f32` (result unused), `atom.global...`,
    `atom.shared...`, predicated or not. The fused backward accumulates dK with global ones; every other kernel
    must have none of any kind (a shared-memory atomic would also make the sum's order vary)."""
    return len(_ATOMIC.findall(ptx))


def parse_ptxas(text: str) -> dict[str, int]:
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return {"registers": int(regs.group(1)) if regs else -1,
            "spill_stores": int(spill.group(1)) if spill else -1,
            "spill_loads": int(spill.group(2)) if spill else -1}


def compile_one(name: str, kernel, dtype: str, config, arch: int, allow_tf32: bool = True) -> CompileResult:
    jit = kernel.fn
    # As launched: the block kernels take TF32 for fp32 unless disallowed; the per-direction ce_* kernels always
    # compute fp32 with IEEE dots.
    if dtype != "fp32":
        precision = "native"
    else:
        precision = "tf32" if allow_tf32 and name.startswith("block") else "ieee"
    constexprs = dict(_fixed_constexprs(name), **config.kwargs, HAS_MASK=True, UPCAST=False,
                      DOT_PRECISION="ieee" if precision == "ieee" else "tf32")
    signature, attrs = _signature(jit, dtype, constexprs)
    label = " ".join(f"{k}={v}" for k, v in config.kwargs.items()) + f" w{config.num_warps} s{config.num_stages}"
    base = dict(kernel=name, dtype=dtype, precision=precision, arch=GPU_NAME[arch], config=label,
                shared_limit=SHARED_LIMIT[arch])
    try:
        compiled = triton.compile(ASTSource(jit, signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    except Exception as e:  # a config that does not compile is a finding, not a crash of the report
        return CompileResult(**base, registers=-1, spill_stores=-1, spill_loads=-1, shared_bytes=-1, dots=0,
                             tensor_core_dots=0, atomics=0, status=f"compile error: {type(e).__name__}: {str(e)[:120]}")
    dots, tensor_core = count_dots(compiled.asm["ttgir"])
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas_path(), "-v", "--gpu-name", GPU_NAME[arch], ptx, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True)
    stats = parse_ptxas(out.stderr + out.stdout)
    status = "ok" if out.returncode == 0 else f"ptxas error: {out.stderr.strip()[-120:]}"
    return CompileResult(**base, **stats, shared_bytes=int(compiled.metadata.shared), dots=dots,
                         tensor_core_dots=tensor_core, atomics=count_atomics(compiled.asm["ptx"]), status=status)


def compile_all(archs=(90, 80), dtypes=("bf16", "fp16", "fp32"), kernels: list[str] | None = None,
                progress=None) -> list[CompileResult]:
    rows = []
    for name, kernel in shipped_kernels().items():
        if kernels and name not in kernels:
            continue
        for dtype in dtypes:
            for config in kernel.configs:
                for arch in archs:
                    rows.append(compile_one(name, kernel, dtype, config, arch))
                    if progress:
                        progress(rows[-1])
    return rows


def as_dict(row: CompileResult) -> dict:
    return dict(asdict(row), all_tensor_core=row.all_tensor_core, problems="; ".join(row.problems))
