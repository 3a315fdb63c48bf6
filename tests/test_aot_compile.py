"""Ahead-of-time compile of every registered Triton kernel config for sm_80 and sm_90, on a
machine without a GPU: it must lower, fit the architecture's shared memory, not spill
registers (unless its spec allows it), and use the tensor cores where it calls tl.dot.

The compile runs in a subprocess (`python -m mmfast.kernels.aot`) because this test process
runs Triton in interpreter mode, whose kernels cannot be compiled."""

import json
import os
import subprocess
import sys

import pytest

from mmfast.kernels import aot

aot.load_all_kernel_modules()
SPECS = [s.name for s in aot.registered()]
ARCHS = (80, 90)


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "mmfast.kernels.aot", *map(str, ARCHS)],
                         env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.aot
@pytest.mark.parametrize("cc", ARCHS)
@pytest.mark.parametrize("spec", SPECS)
def test_compiles_for_gpu(compiled, spec, cc):
    records = [r for r in compiled if r["spec"] == spec and r["cc"] == cc]
    assert records, f"{spec} was not compiled for sm_{cc}"
    problems = []
    for r in records:
        label = (f"{spec} sm_{cc} {r['dtype']} {r['constexprs']} warps={r['num_warps']} "
                 f"stages={r['num_stages']}")
        if "error" in r:
            problems.append(f"{label}: does not lower: {r['error']}")
            continue
        print(f"{label}: {r['registers']} regs, {r['spill_bytes']} B spilled, "
              f"{r['shared']} B shared, mma={r['has_mma']} wgmma={r['has_wgmma']}")
        if r["shared"] > aot.SHARED_LIMIT[cc]:
            problems.append(f"{label}: {r['shared']} B shared memory > {aot.SHARED_LIMIT[cc]}")
        if r["spill_bytes"] and not r["allow_spills"]:
            problems.append(f"{label}: spills {r['spill_bytes']} B of registers")
        if r["uses_dot"] and cc == 80 and not r["has_mma"]:
            problems.append(f"{label}: no mma.sync in the PTX (tensor cores unused)")
        if r["uses_dot"] and cc == 90 and not r["has_wgmma"]:
            problems.append(f"{label}: no wgmma in the PTX (Hopper tensor cores unused)")
    assert not problems, "\n".join(problems)
