"""Every shipped bf16/fp16 Triton config compiles for sm_90a and sm_80 without spills, with tensor-core dots only,
within the target's shared memory. No GPU needed: Triton compiles for the target and the wheel's ptxas reports.

    pytest tests/test_kernels_compile.py            # 1-4 s per compilation here, 88 compilations

The full table, fp32 included, is benchmarks/results/kernels_compile.md (`clove-dist bench compile`). Runs in a child
process: the kernels must be imported without TRITON_INTERPRET, which other test modules' children set.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.slow

CHILD = r"""
import json, sys
from clove_kernels import compile_report as cr
names = sys.argv[1].split(",")
dtypes = sys.argv[2].split(",")
rows = cr.compile_all(archs=(90, 80), dtypes=tuple(dtypes), kernels=names)
print(json.dumps([cr.as_dict(r) for r in rows]))
"""


def compile_in_child(kernels, dtypes):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", CHILD, ",".join(kernels), ",".join(dtypes)], capture_output=True,
                         text=True, env=env, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ptxas_ships_with_triton():
    from clove_kernels.compile_report import ptxas_path
    assert os.access(ptxas_path(), os.X_OK)


def test_dot_counting_tells_tensor_cores_from_fma():
    """The TTGIR reader on the three forms a dot lowers to; an FMA dot must not count as tensor core."""
    from clove_kernels.compile_report import count_dots
    wgmma = "%1 = ttng.warp_group_dot %a, %b, %c : !ttg.memdesc<64x32xbf16> * !ttg.memdesc<32x64xbf16> -> tensor<64x64xf32, #mma>"
    mma = "%2 = tt.dot %a, %b, %c : tensor<64x32xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma}>> * tensor<32x64xbf16> -> tensor<64x64xf32, #mma>"
    fma = "%3 = tt.dot %a, %b, %c, inputPrecision = ieee : tensor<64x32xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * tensor<32x64xf32> -> tensor<64x64xf32, #blocked>"
    assert count_dots("\n".join([wgmma, mma, fma])) == (3, 2)


def test_atomic_counting_reads_ptx():
    """The PTX reader counts predicated and plain global atomics (the forms seen for the fused kernel: vector adds
    on sm_90a, scalar on sm_80) and ignores loads, stores and names that merely contain 'atom'."""
    from clove_kernels.compile_report import count_atomics
    ptx = "\n".join([
        "\t@%p68 atom.global.gpu.relaxed.add.v4.f32 { %r587, %r588, %r589, %r590 }, [ %rd9 + 0 ], { %r1, %r2 };",
        "\t@!%p3 atom.global.gpu.relaxed.add.f32 %r755, [ %rd4 + 0 ], %r6;",
        "\tred.global.add.f32 [%rd1], %f1;",
        "\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd5 + 0 ];",
        "\tst.global.b32 [ %rd6 + 0 ], %r7;  // atomics none here",
        "\tmov.u32 %r_atom, 0;",
    ])
    assert count_atomics(ptx) == 3


@pytest.mark.parametrize("kernels", [["block_fwd", "block_bwd_dq", "block_bwd_dk", "block_bwd_fused"],
                                     ["ce_fwd", "ce_bwd_dq", "ce_bwd_dk"]], ids=["block", "per_direction"])
def test_shipped_low_precision_configs_use_the_hardware(kernels):
    rows = compile_in_child(kernels, ["bf16", "fp16"])
    # kernels x dtypes x targets x configs, none lost (every kernel ships at least 2 configs)
    assert {r["kernel"] for r in rows} == set(kernels) and len(rows) >= len(kernels) * 2 * 2 * 2
    bad = [f"{r['kernel']} {r['dtype']} {r['arch']} {r['config']}: {r['problems'] or r['status']}"
           for r in rows if r["problems"] or r["status"] != "ok"]
    assert not bad, "\n".join(bad)
    # The fused backward's dK accumulation compiled to global atomic adds; no other kernel has any (the
    # deterministic path must stay free of them).
    wrong = [f"{r['kernel']} {r['dtype']} {r['arch']} {r['config']}: {r['atomics']} atomics" for r in rows
             if (r["atomics"] > 0) != (r["kernel"] == "block_bwd_fused")]
    assert not wrong, "\n".join(wrong)


CHILD_BAD = r"""
import json, triton
from clove_kernels import compile_report as cr
k = cr.shipped_kernels()["ce_bwd_dq"]
big = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64}, num_warps=4, num_stages=2)
rows = [cr.compile_one("ce_bwd_dq", k, "bf16", big, 80), cr.compile_one("ce_bwd_dq", k, "fp32", k.configs[0], 90)]
print(json.dumps([cr.as_dict(r) for r in rows]))
"""


def test_the_check_catches_spills_and_fma_dots():
    """The check can fail: a config this project dropped for spilling (4 warps, D slices of 64: ~680 B of spills
    on sm_80) and an IEEE fp32 dot (FMA loops) are both reported as problems."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", CHILD_BAD], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    spilling, fma = json.loads(out.stdout.strip().splitlines()[-1])
    assert spilling["spill_stores"] > 0 and "spills" in spilling["problems"]
    assert fma["tensor_core_dots"] == 0 and "not on tensor cores" in fma["problems"]
