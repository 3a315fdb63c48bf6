import contextlib
import itertools
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast import ops, reference
from mmfast.ops.projector import first_layer_node_lowers_peak
from tests.helpers import DTYPES, assert_pytest_passes, cpu_has_avx512, sample_inputs
from tests.ops._projector_common import check_like_torch, compare_fwd_bwd
from tests.samples.projector import make_weights


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_on_samples(dtype):
    for sample in sample_inputs("projector", dtype=dtype, requires_grad=True):
        compare_fwd_bwd(ops.projector, reference.projector, sample.args, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,approximate,bias", [(1, "none", True), (577, "tanh", False),
                                                 (300, "none", True)])
def test_odd_llava_sizes(dtype, n, approximate, bias):
    """Cin 1000 and hidden 4097 (neither a multiple of anything useful), N from 1 to 577."""
    cin, hidden, hout = 1000, 4097, 72
    x = torch.randn(n, cin, dtype=dtype)
    w1, b1, w2, b2 = make_weights(cin, hidden, hout, device="cpu", dtype=dtype, bias=bias,
                                  requires_grad=True)
    compare_fwd_bwd(ops.projector, reference.projector,
                    (x.requires_grad_(), w1, b1, w2, b2, approximate), dtype)


def test_bfloat16_gemm_tiling_edges():
    """bfloat16 at the sizes the packed-GEMM path (vdpbf16ps tiles) pads or cuts: odd Cin and
    token count (K padded with a zero column), 513 tokens (two full 256-row tiles and one row),
    4097 output columns (64-column blocks, the last one partial), and weights read with a row
    stride: w1 a slice (odd K, stride 1028), w2 a slice (even K, stride 132)."""
    cin, hidden, hout, n = 1025, 130, 4097, 513
    dt = torch.bfloat16
    x = torch.randn(n, cin, dtype=dt)
    w1, b1, w2, b2 = make_weights(cin, hidden, hout, device="cpu", dtype=dt, bias=True)
    w1 = torch.cat([w1, torch.randn(hidden, 3, dtype=dt)], 1)[:, :cin]
    w2 = torch.cat([w2, torch.randn(hout, 2, dtype=dt)], 1)[:, :hidden]
    args = [t.requires_grad_() for t in (x, w1, b1, w2, b2)]
    for approximate in ("none", "tanh"):  # compare_fwd_bwd takes fresh leaves of args each time
        compare_fwd_bwd(ops.projector, reference.projector, (*args, approximate), dt)


def _tiles_can_run():
    caps = torch.cpu.get_capabilities()
    return mmfast.cpu_isa() == "avx512" and caps.get("avx512_bf16", False)


def _amx_can_run():
    return _tiles_can_run() and torch.cpu.get_capabilities().get("amx_bf16", False)


def test_cpu_bf16_gemm_follows_cpu_flags():
    """The projector's bfloat16 GEMMs run on mmfast's tiles in the AVX512 build on a CPU with
    avx512_bf16: AMX tiles where the CPU has AMX-BF16, vdpbf16ps tiles elsewhere; without
    avx512_bf16 they run on fma_gemm where the AVX2 build is active, else go through ATen on
    AVX-512 CPUs and are float32 GEMMs on widened operands on the others.
    MMFAST_CPU_BF16_GEMM=amx|tiles|aten|widen|fma overrides the rule where the kernel can
    run."""
    forced = os.environ.get("MMFAST_CPU_BF16_GEMM", "auto")
    if forced == "aten":
        expected = "ATen (MMFAST_CPU_BF16_GEMM=aten)"
    elif forced == "widen":
        expected = "float32 GEMMs on widened operands (MMFAST_CPU_BF16_GEMM=widen)"
    elif forced == "fma":
        expected = "fma_gemm (MMFAST_CPU_BF16_GEMM=fma)"
    elif not _tiles_can_run():
        if mmfast.cpu_isa() == "avx2":
            expected = "fma_gemm (the AVX2 build: AVX2 and FMA)"
        elif cpu_has_avx512():
            expected = "ATen (no avx512_bf16 in the active build)"
        else:
            expected = ("float32 GEMMs on widened operands (no AVX-512: ATen's bfloat16 GEMM is "
                        "a scalar loop)")
    elif forced == "tiles":
        expected = "vdpbf16ps tiles (MMFAST_CPU_BF16_GEMM=tiles)"
    elif forced == "amx":
        expected = "AMX tiles (MMFAST_CPU_BF16_GEMM=amx)"
    elif _amx_can_run():
        expected = "AMX tiles (AMX-BF16)"
    else:
        expected = "vdpbf16ps tiles (avx512_bf16, no AMX)"
    assert mmfast.cpu_bf16_gemm() == expected
    tiles = expected.startswith(("AMX", "vdpbf16ps"))
    assert torch.ops.mmfast._cpu_bf16_tile_gemm() == tiles


def test_cpu_f16_gemm_follows_avx512_fp16():
    """float16 GEMMs run on fma_gemm where the AVX2 build is active, else go through ATen
    where the CPU has avx512_fp16 (oneDNN's float16 kernels), else they are float32 GEMMs on
    widened operands. MMFAST_CPU_F16_GEMM=aten|widen|fma overrides."""
    forced = os.environ.get("MMFAST_CPU_F16_GEMM", "auto")
    if forced == "aten":
        expected = "ATen (MMFAST_CPU_F16_GEMM=aten)"
    elif forced == "widen":
        expected = "float32 GEMMs on widened operands (MMFAST_CPU_F16_GEMM=widen)"
    elif forced == "fma":
        expected = "fma_gemm (MMFAST_CPU_F16_GEMM=fma)"
    elif mmfast.cpu_isa() == "avx2":
        expected = "fma_gemm (the AVX2 build: AVX2 and FMA)"
    elif torch.cpu.get_capabilities().get("avx512_fp16", False):
        expected = "ATen (avx512_fp16)"
    else:
        expected = ("float32 GEMMs on widened operands (no avx512_fp16: ATen's float16 GEMM is "
                    "a scalar loop)")
    assert mmfast.cpu_f16_gemm() == expected


# The tests of the tile paths (packed_gemm): on an AMX CPU, where the AMX tiles are the default,
# test_bfloat16_tile_kernels_forced_where_amx_is_the_default runs them with each tile kernel
# forced, so CI covers both on an AMX machine (a CPU without AMX runs only its own).
TILE_PATH_TESTS = [
    "tests/ops/test_projector.py::test_cpu_bf16_gemm_follows_cpu_flags",
    "tests/ops/test_projector.py::test_matches_reference_on_samples",
    "tests/ops/test_projector.py::test_bfloat16_gemm_tiling_edges",
    "tests/ops/test_projector.py::test_bfloat16_gemm_over_many_panels",
    "tests/ops/test_projector.py::test_bfloat16_packed_backward_gradients",
    "tests/ops/test_projector.py::test_bfloat16_packed_backward_over_panels",
    "tests/ops/test_projector.py::test_bfloat16_weight_gradient_over_panels",
    "tests/ops/test_projector.py::test_bfloat16_packed_forward_over_panels",
    "tests/ops/test_projector.py::test_bfloat16_activation_tiles_zero_past_hidden",
    "tests/ops/test_projector.py::test_bfloat16_buffers_on_huge_pages",
    "tests/ops/test_projector.py::test_first_layer_gradients_from_any_grad_link_layout",
    "tests/ops/test_projector.py::test_two_node_backward",
    "tests/ops/test_projector.py::test_bfloat16_gelu_on_every_input",
    "tests/ops/test_projector_splice.py::test_matches_masked_scatter_on_samples",
    "tests/ops/test_projector_prepacked.py",
    "tests/nn/test_projector.py::test_prepack_serves_inference_and_follows_weight_changes",
]


@pytest.mark.skipif(not _amx_can_run() or os.environ.get("MMFAST_CPU_BF16_GEMM", "auto") != "auto",
                    reason="no AMX here (the default tile kernel is the vdpbf16ps one), or a "
                           "kernel is forced already")
@pytest.mark.parametrize("kernel", ["tiles", "amx"])
def test_bfloat16_tile_kernels_forced_where_amx_is_the_default(kernel):
    """On an AMX CPU each tile kernel passes the tile tests forced (none skipped): the vdpbf16ps
    tiles (MMFAST_CPU_BF16_GEMM=tiles) and the AMX tiles (=amx)."""
    stdout = assert_pytest_passes(TILE_PATH_TESTS, None, MMFAST_CPU_BF16_GEMM=kernel)
    assert " passed" in stdout and "bfloat16 GEMMs here" not in stdout, stdout[-3000:]


@pytest.mark.skipif(not _tiles_can_run(), reason="no avx512_bf16 in the active build")
def test_bfloat16_gemm_over_many_panels():
    """A GEMM whose A spans nine panels (Cin 16385: one 256-row tile of x is over 8 MiB). On AMX
    tiles the threads pack each panel of A into tiles as work items, into two buffers in turn:
    the packing of panel 2 waits until panel 0's items are done. Odd K, 2100 tokens (nine 256-row
    tiles, the last 52 rows); the result does not depend on the thread count."""
    dt = torch.bfloat16
    x = torch.randn(2100, 16385, dtype=dt)
    w1, b1, w2, b2 = make_weights(16385, 72, 40, device="cpu", dtype=dt, bias=True)
    args = [t.requires_grad_() for t in (x, w1, b1, w2, b2)]
    compare_fwd_bwd(ops.projector, reference.projector, (*args, "none"), dt)
    if torch.ops.mmfast._cpu_bf16_tile_gemm():
        grads = torch.autograd.grad(ops.projector(*args).sum(), args)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            again = torch.autograd.grad(ops.projector(*args).sum(), args)
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(a, b) for a, b in zip(grads, again))


@pytest.mark.parametrize("variable,query", [("MMFAST_CPU_BF16_GEMM", "cpu_bf16_gemm"),
                                            ("MMFAST_CPU_F32_GEMM", "cpu_f32_gemm"),
                                            ("MMFAST_CPU_F16_GEMM", "cpu_f16_gemm"),
                                            ("MMFAST_CPU_XATTN_BF16", "cpu_xattn_bf16"),
                                            ("MMFAST_CPU_MERGE_GEMM", "cpu_merge_gemm")])
def test_bad_gemm_choice_is_a_clear_error(variable, query):
    env = dict(os.environ, **{variable: "fastest"})
    out = subprocess.run([sys.executable, "-c", f"import mmfast; print(mmfast.{query}())"],
                         env=env, capture_output=True, text=True)
    assert out.returncode != 0 and variable in out.stderr, out.stderr[-2000:]


@pytest.mark.parametrize("path", ["aten", "widen", "fma"])
def test_bfloat16_without_packed_gemm(path):
    """Without the tile GEMMs (forced by MMFAST_CPU_BF16_GEMM, in the AVX2 build, whose
    elementwise passes then run), bfloat16 GEMMs go through ATen (oneDNN's bfloat16 kernels on
    AVX-512 CPUs), float32 GEMMs on widened operands, or fma_gemm (the AVX2 build's default):
    projector and splice still match, forward and backward."""
    if path == "aten" and not cpu_has_avx512():
        pytest.skip("ATen's bfloat16 GEMMs are scalar loops without AVX-512 (minutes here)")
    tests = ["tests/ops/test_projector.py::test_cpu_bf16_gemm_follows_cpu_flags",
             "tests/ops/test_projector.py::test_matches_reference_on_samples[dtype2]",
             "tests/ops/test_projector.py::test_odd_llava_sizes[577-tanh-False-dtype2]",
             "tests/ops/test_projector.py::test_bfloat16_gemm_tiling_edges",
             "tests/ops/test_projector.py::test_two_node_backward[True-dtype2]",
             "tests/ops/test_projector_splice.py::test_matches_masked_scatter_on_samples[dtype2]"]
    assert_pytest_passes(tests, None, MMFAST_CPU_BF16_GEMM=path, MMFAST_CPU_ISA="avx2")


# (x, w1, b1, w2, b2) trained: each gradient the packed backward makes, alone and together.
@pytest.mark.parametrize("trained", [(True, False, False, False, False),
                                     (False, True, False, False, False),
                                     (False, False, True, True, False),
                                     (False, True, True, True, True),
                                     (True, True, True, True, True)])
def test_bfloat16_packed_backward_gradients(trained):
    """bfloat16 with enough tokens (391) for the packed backward with the vdpbf16ps tiles (fewer
    go through ATen): the requested gradients match the reference, odd token count included.
    x is read in place by the tile kernel: an odd row stride (75) and a start 2 bytes off a
    4-byte boundary, so its bfloat16 pairs are unaligned."""
    dt = torch.bfloat16
    x = torch.randn(391, 75, dtype=dt)[:, 1:73]
    w1, b1, w2, b2 = make_weights(72, 96, 40, device="cpu", dtype=dt, bias=True)
    args = [t.requires_grad_(r) for t, r in zip((x, w1, b1, w2, b2), trained)]
    compare_fwd_bwd(ops.projector, reference.projector, (*args, "none"), dt)


def _compare_bfloat16(tokens, hidden, out_features, trained=(True,) * 5):
    """bfloat16 projector of `tokens` x 40 features against the reference, forward and the
    gradients of the inputs (x, w1, b1, w2, b2) that `trained` marks."""
    dt = torch.bfloat16
    x = torch.randn(tokens, 40, dtype=dt)
    weights = make_weights(40, hidden, out_features, device="cpu", dtype=dt, bias=True)
    args = [t.requires_grad_(r) for t, r in zip((x, *weights), trained)]
    compare_fwd_bwd(ops.projector, reference.projector, (*args, "none"), dt)


@pytest.mark.parametrize("hidden,w2_trained", [(128, True), (100, True), (128, False)])
def test_bfloat16_packed_backward_over_panels(hidden, w2_trained):
    """bfloat16, grad_out over 8 MiB (1100 x 4096: two panels of its rows in the g w2 GEMM,
    which packs w2 once for both when w2 is trained, else per panel). On AMX tiles the two
    panels' A tiles share one buffer (the packing of panel 1 waits until panel 0's items are
    done), and dw2 reads the activation packed from h; hidden 100 ends in a partial group of 16
    units."""
    _compare_bfloat16(1100, hidden, 4096, trained=(True, True, True, w2_trained, True))


def test_bfloat16_weight_gradient_over_panels():
    """bfloat16, dw2 whose A (the activation transposed, 1000 x 4098 with the odd token count
    padded) spans two 8 MiB panels: g is then packed once for both, into the storage grad_h^T
    held (free after dw1), rather than per panel. 100 output columns end in a partial block;
    the values are the reference's whatever that storage held."""
    _compare_bfloat16(4097, 1000, 100)


def test_bfloat16_first_weight_gradient_over_three_panels():
    """bfloat16, dw1 whose A (grad_h transposed, 1600 x 4098 with the odd token count padded)
    spans three 8 MiB panels: on AMX tiles x is then packed once for all of them rather than
    per panel. 40 input features are one partial column block."""
    _compare_bfloat16(4097, 1600, 72, trained=(False, True, True, True, True))


@pytest.mark.skipif(not _tiles_can_run(), reason="no avx512_bf16 in the active build")
def test_bfloat16_buffers_on_huge_pages():
    """Buffers of 8 MiB and more come from huge pages (cpu/huge_pages.h): at hidden 2048 the
    forward's activation panel (2048 rows) and the backward's grad_h^T (and act^T on the
    vdpbf16ps tiles; 2048 x 2050, odd token count padded) are that large. Their values are the
    reference's."""
    _compare_bfloat16(2049, 2048, 72)


def test_bfloat16_activation_tiles_zero_past_hidden():
    """On AMX tiles the forward's first GEMM writes the activation as the second GEMM's A tiles,
    32 hidden units per step: the step holding an odd hidden size's last units (97: units
    96..127, 33: 32..63) must be zeros past it, whatever the buffer held before. Blocks of the
    buffer's size filled with NaN and freed just before each call are what the allocator hands
    back; the output stays the reference's."""
    dt = torch.bfloat16
    for n, hidden in [(17, 97), (1, 33), (729, 100)]:
        x = torch.randn(n, 40, dtype=dt)
        w1, b1, w2, b2 = make_weights(40, hidden, 24, device="cpu", dtype=dt, bias=True)
        steps = math.ceil((hidden + hidden % 2) / 32)
        numel = math.ceil(n / 16) * 16 * steps * 32
        expected = reference.projector(*(t.double() for t in (x, w1, b1, w2, b2)))
        same_dtype = reference.projector(x, w1, b1, w2, b2)
        for _ in range(3):
            poison = [torch.full((numel,), math.nan, dtype=dt) for _ in range(8)]
            del poison
            with torch.no_grad():
                out = ops.projector(x, w1, b1, w2, b2)
            check_like_torch(out, same_dtype, expected, dt, "output")


@pytest.mark.parametrize("trained", [False, True])
def test_bfloat16_packed_forward_over_panels(trained):
    """bfloat16 forward by panels of rows (vdpbf16ps tiles): hidden 2050 gives panels of
    1792 rows, so 4184 tokens make three (without h to keep, the first GEMM of each next panel
    runs alongside the second GEMM of the one before, into the other activation buffer) and
    the last, 600 rows, ends in three tiles that the last blocks' work items take one at a
    time. The splice writes the same rows through its row map; with the tiles neither depends
    on the thread count (ATen's GEMMs, on other CPUs, promise no such thing)."""
    dt = torch.bfloat16
    x = torch.randn(4184, 40, dtype=dt)
    w1, b1, w2, b2 = make_weights(40, 2050, 130, device="cpu", dtype=dt, bias=True)
    args = [t.requires_grad_(trained) for t in (x, w1, b1, w2, b2)]
    compare_fwd_bwd(ops.projector, reference.projector, (*args, "tanh"), dt)
    with torch.no_grad():
        out = ops.projector(*args, "tanh")
        mask = torch.zeros(3, 2000, dtype=torch.bool)
        mask.view(-1)[torch.randperm(6000)[:4184]] = True
        embeds = torch.randn(3, 2000, 130, dtype=dt)
        spliced = ops.projector_splice(*args, embeds, mask, "tanh")
        assert torch.equal(spliced[mask], out) and torch.equal(spliced[~mask], embeds[~mask])
        if torch.ops.mmfast._cpu_bf16_tile_gemm():
            threads = torch.get_num_threads()
            try:
                torch.set_num_threads(1)
                assert torch.equal(ops.projector(*args, "tanh"), out)
            finally:
                torch.set_num_threads(threads)


# (x, w1, b1, w2, b2) trained, and whether x and w2 are column slices (x's dw1 then goes
# through MKL; w2's transposed copy reads rows with a stride).
@pytest.mark.parametrize("trained,sliced", [((False, True, True, True, True), False),
                                            ((False, True, True, True, True), True),
                                            ((True, False, False, True, False), False),
                                            ((False, False, False, True, True), False),
                                            ((True, True, False, False, False), True)])
def test_float32_transposing_backward(trained, sliced):
    """float32 (through oneDNN where mmfast.cpu_f32_gemm() says so; the other path is forced by
    test_float32_on_the_other_gemm_path): oneDNN's backward pass writes act^T and grad_h^T
    through tiles of 64 x 256, so 2100 tokens (from 2048 w2 is transposed for g w2) end in a
    partial row tile and hidden 300 in a partial column tile; b1's gradient is summed over
    blocks of rows."""
    dt = torch.float32
    x = torch.randn(2100, 43, dtype=dt)
    x = x[:, 1:41] if sliced else x[:, :40].contiguous()
    w1, b1, w2, b2 = make_weights(40, 300, 77, device="cpu", dtype=dt, bias=True)
    if sliced:
        w2 = torch.cat([torch.randn(77, 5, dtype=dt), w2], 1)[:, 5:]
    args = [t.requires_grad_(r) for t, r in zip((x, w1, b1, w2, b2), trained)]
    compare_fwd_bwd(ops.projector, reference.projector, (*args, "none"), dt)


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_float32_transposing_backward_each_isa(isa):
    """The float32 backward's transposes (transpose32) in the generic and AVX2 builds, forced by
    MMFAST_CPU_ISA; the rest of the suite runs the best build this CPU has."""
    tests = ["tests/ops/test_projector.py::test_float32_transposing_backward",
             "tests/ops/test_projector.py::test_odd_llava_sizes[577-tanh-False-dtype0]"]
    assert_pytest_passes(tests, 6, MMFAST_CPU_ISA=isa, MMFAST_CPU_F32_GEMM="onednn")


def test_cpu_f32_gemm_follows_cpu_vendor():
    """float32 GEMMs run on fma_gemm where the AVX2 build is active, else go through oneDNN's
    linear except on Intel CPUs, where ATen's mm (MKL) is as fast;
    MMFAST_CPU_F32_GEMM=onednn|mkl|fma overrides."""
    forced = os.environ.get("MMFAST_CPU_F32_GEMM", "auto")
    intel = None
    if sys.platform == "linux":
        with open("/proc/cpuinfo") as f:
            intel = "GenuineIntel" in f.read()
    if forced == "onednn":
        expected = "oneDNN linear (MMFAST_CPU_F32_GEMM=onednn)"
    elif forced == "mkl":
        expected = "ATen mm (MMFAST_CPU_F32_GEMM=mkl)"
    elif forced == "fma":
        expected = "fma_gemm (MMFAST_CPU_F32_GEMM=fma)"
    elif mmfast.cpu_isa() == "avx2":
        expected = "fma_gemm (the AVX2 build: AVX2 and FMA)"
    elif intel is None:
        pytest.skip("CPU vendor read from /proc/cpuinfo")
    else:
        expected = "ATen mm (MKL; Intel CPU)" if intel else "oneDNN linear (not an Intel CPU)"
    assert mmfast.cpu_f32_gemm() == expected


_F32_PATH_PREFIX = {"onednn": "oneDNN", "mkl": "ATen mm", "fma": "fma_gemm"}


def _skip_unless_another_path(default: str, prefix: str, path: str):
    """Skips a forced-path test where `path` (its choice string starting with `prefix`) is this
    CPU's default (`default`), which the whole suite runs, or where fma_gemm has no build."""
    if default.startswith(prefix):
        pytest.skip(f"{path} is this CPU's default: the whole suite runs it")
    if path == "fma" and mmfast.cpu_isa() == "default":
        pytest.skip("fma_gemm needs the AVX2 or AVX512 build")


@pytest.mark.parametrize("path", sorted(_F32_PATH_PREFIX))
def test_float32_on_the_other_gemm_paths(path):
    """Each float32 GEMM path this CPU does not take by default (oneDNN with the transposing
    backward, MKL, fma_gemm), forced by MMFAST_CPU_F32_GEMM: forward, backward and splice
    still match."""
    _skip_unless_another_path(mmfast.cpu_f32_gemm(), _F32_PATH_PREFIX[path], path)
    tests = ["tests/ops/test_projector.py::test_cpu_f32_gemm_follows_cpu_vendor",
             "tests/ops/test_projector.py::test_float32_transposing_backward",
             "tests/ops/test_projector.py::test_matches_reference_on_samples[dtype0]",
             "tests/ops/test_projector.py::test_odd_llava_sizes[577-tanh-False-dtype0]",
             "tests/ops/test_projector_splice.py::test_matches_masked_scatter_on_samples[dtype0]",
             "tests/ops/test_projector.py::test_two_node_backward[False-dtype0]",
             "tests/ops/test_projector.py::test_two_node_backward[True-dtype0]"]
    assert_pytest_passes(tests, 11, MMFAST_CPU_F32_GEMM=path)


@pytest.mark.parametrize("path", ["widen", "fma"])
def test_float16_on_the_other_gemm_paths(path):
    """The float16 GEMM paths this CPU does not take by default, forced by
    MMFAST_CPU_F16_GEMM (ATen's where it has no float16 kernels is a scalar loop: not run)."""
    _skip_unless_another_path(mmfast.cpu_f16_gemm(),
                              {"widen": "float32 GEMMs", "fma": "fma_gemm"}[path], path)
    tests = ["tests/ops/test_projector.py::test_cpu_f16_gemm_follows_avx512_fp16",
             "tests/ops/test_projector.py::test_matches_reference_on_samples[dtype1]",
             "tests/ops/test_projector.py::test_odd_llava_sizes[577-tanh-False-dtype1]",
             "tests/ops/test_projector.py::test_two_node_backward[True-dtype1]",
             "tests/ops/test_projector_splice.py::test_matches_masked_scatter_on_samples[dtype1]"]
    assert_pytest_passes(tests, None, MMFAST_CPU_F16_GEMM=path)


# Every combination of frozen / trained inputs (x, w1, b1, w2, b2).
@pytest.mark.parametrize("trained", [m for m in itertools.product((False, True), repeat=5) if any(m)])
def test_frozen_inputs_get_no_gradient(trained):
    x = torch.randn(2, 3, 24)  # 6 tokens: two backward nodes where w1 trains
    w1, b1, w2, b2 = make_weights(24, 50, 20, device="cpu", dtype=torch.float32)
    args = [t.requires_grad_(r) for t, r in zip((x, w1, b1, w2, b2), trained)]
    compare_fwd_bwd(ops.projector, reference.projector, (*args, "tanh"), torch.float32)
    leaves = [t.detach().requires_grad_(r) for t, r in zip(args, trained)]
    out = ops.projector(*leaves)
    with _spying(BACKWARD_OPS) as calls:
        out.sum().backward()
    # On CPU the first layer's gradients have a node of their own where that lowers the peak.
    if first_layer_node_lowers_peak(*leaves[:2], leaves[3]):
        assert [name for name, _ in calls] == ["_projector_backward_head", "_projector_backward_tail"]
        (_, head), (_, tail) = calls
        assert head[0], "the head must hand grad_h on to the first layer's node"
        asked = tail + head[1:]
    else:
        assert [name for name, _ in calls] == ["projector_backward"]
        asked = calls[0][1]
    assert asked == list(trained), "the backward must be asked for exactly the needed gradients"
    for t, r in zip(leaves, trained):
        assert (t.grad is not None) == r


BACKWARD_OPS = ("projector_backward", "_projector_backward_head", "_projector_backward_tail")


@contextlib.contextmanager
def _spying(names):
    """Records (name, output_mask) of each call of the named torch.ops.mmfast ops, in order."""
    calls, originals = [], {n: getattr(torch.ops.mmfast, n) for n in names}

    def spy(name):
        def call(*a):
            calls.append((name, list(a[-1])))
            return originals[name](*a)
        return call

    for n in names:
        setattr(torch.ops.mmfast, n, spy(n))
    try:
        yield calls
    finally:
        for n, op in originals.items():
            setattr(torch.ops.mmfast, n, op)


@pytest.mark.parametrize("tokens", [9, 90])
def test_second_layer_gradient_reaches_grad_before_the_first_layers(tokens):
    """With few tokens (9) against 24 input features, as eager's two Linear nodes: w2's
    gradient is added into w2.grad (and freed) before the first layer's are computed, so the
    two weight gradients are never held together. With more (90), grad_h^T [50, 90] would
    outweigh dw1 [50, 24]: one node computes them all."""
    x = torch.randn(3, tokens // 3, 24)
    w1, b1, w2, b2 = make_weights(24, 50, 20, device="cpu", dtype=torch.float32, requires_grad=True)
    out = ops.projector(x, w1, b1, w2, b2)
    with _spying(BACKWARD_OPS) as calls:
        w2.register_post_accumulate_grad_hook(lambda p: calls.append(("w2.grad", None)))
        w1.register_post_accumulate_grad_hook(lambda p: calls.append(("w1.grad", None)))
        out.square().sum().backward()
    names = [n for n, _ in calls]
    if tokens < 12:
        assert names == ["_projector_backward_head", "w2.grad", "_projector_backward_tail",
                         "w1.grad"]
    else:
        assert names[0] == "projector_backward" and sorted(names[1:]) == ["w1.grad", "w2.grad"]


def _saved_tensors(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_backward_keeps_only_input_and_pre_activation():
    """Alignment stage (x frozen, weights trained): the only activations kept are x and h
    [N, hidden] (eager also keeps gelu(h)); w1 is not kept since x needs no gradient."""
    x = torch.randn(13, 24)
    w1, b1, w2, b2 = make_weights(24, 50, 20, device="cpu", dtype=torch.float32, requires_grad=True)
    out, saved = _saved_tensors(lambda: ops.projector(x, w1, b1, w2, b2))
    saved_ids = {id(t) for t in saved}
    assert id(x) in saved_ids and id(w2) in saved_ids and id(w1) not in saved_ids
    activations = [t for t in saved if t is not x and t is not w2]
    assert [tuple(t.shape) for t in activations] == [(13, 50)]
    torch.testing.assert_close(activations[0], F.linear(x, w1, b1))
    _, eager_saved = _saved_tensors(lambda: reference.projector(x, w1, b1, w2, b2))
    eager_bytes = sum(t.numel() * t.element_size() for t in eager_saved if t.dim() and t.shape[0] == 13)
    ours_bytes = sum(t.numel() * t.element_size() for t in saved if t.dim() and t.shape[0] == 13)
    assert ours_bytes < eager_bytes
    out.sum().backward()
    assert x.grad is None and all(p.grad is not None for p in (w1, b1, w2, b2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_drops_the_pre_activation(dtype):
    """Without a backward to come the GELU runs in place: h comes back empty, out is the same."""
    sample = sample_inputs("projector", dtype=dtype)[0]
    out_keep, h = torch.ops.mmfast.projector(*sample.args, True)
    out_drop, empty = torch.ops.mmfast.projector(*sample.args, False)
    assert h.shape[-1] == sample.args[1].shape[0] and empty.numel() == 0
    torch.testing.assert_close(out_drop, out_keep, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(ops.projector(*sample.args), out_keep, atol=0, rtol=0)
    x = sample.args[0].detach().requires_grad_()
    with pytest.raises(RuntimeError, match="keep_h"):
        torch.ops.mmfast.projector(x, *sample.args[1:], False)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    for dtype in (torch.float32, torch.bfloat16):
        for sample in sample_inputs("projector", dtype=dtype, requires_grad=requires_grad):
            torch.library.opcheck(torch.ops.mmfast.projector.default, sample.args)
            if not requires_grad:
                torch.library.opcheck(torch.ops.mmfast.projector.default, (*sample.args, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_backward(dtype):
    for sample in sample_inputs("projector", dtype=dtype):
        x, w1, b1, w2, b2, approximate = sample.args
        out, h = torch.ops.mmfast.projector(*sample.args)
        for mask in ([True] * 5, [False, True, False, True, False], [True, False, False, False, False],
                     [False, False, False, True, True]):
            torch.library.opcheck(torch.ops.mmfast.projector_backward.default,
                                  (torch.randn_like(out), x, h, w1, w2, approximate, mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_training_graph_ops(dtype):
    """The CPU training graph's ops: the link, the forward taking it, and the two backwards."""
    for sample in sample_inputs("projector", dtype=dtype, requires_grad=True):
        x, w1, b1, w2, b2, approximate = sample.args
        link = torch.ops.mmfast._projector_link(x, w1)
        assert link.stride() == (0, 0) and link.untyped_storage().nbytes() <= link.element_size()
        torch.library.opcheck(torch.ops.mmfast._projector_link.default, (x, w1))
        torch.library.opcheck(torch.ops.mmfast._projector_linked.default,
                              (x, w1, b1, w2, b2, link, approximate))
        with torch.no_grad():
            out, h = torch.ops.mmfast.projector(x, w1, b1, w2, b2, approximate)
        x, w1, w2 = x.detach(), w1.detach(), w2.detach()
        grad_out = torch.randn_like(out)
        for mask in ([True] * 4, [True, False, True, False], [False, False, True, True]):
            torch.library.opcheck(torch.ops.mmfast._projector_backward_head.default,
                                  (grad_out, x, h, w2, approximate, mask))
        grad_link = torch.randn(link.shape, dtype=dtype)
        for mask in ([True, True], [False, True], [True, False]):
            torch.library.opcheck(torch.ops.mmfast._projector_backward_tail.default,
                                  (grad_link, x, w1, mask))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_trained", [False, True])
def test_two_node_backward(dtype, x_trained):
    """The two-node training graph where it runs (half as many tokens as input features or
    fewer), here with 577 tokens (odd; bfloat16: the packed backward, whose grad_h^T the first
    layer's node reads in place) against 1200 input features."""
    x = torch.randn(577, 1200, dtype=dtype)
    w1, b1, w2, b2 = make_weights(1200, 96, 40, device="cpu", dtype=dtype, bias=True,
                                  requires_grad=True)
    x.requires_grad_(x_trained)
    assert first_layer_node_lowers_peak(x, w1, w2)
    compare_fwd_bwd(ops.projector, reference.projector, (x, w1, b1, w2, b2, "none"), dtype)


@pytest.mark.parametrize("layout", ["contiguous", "padded", "transposed"])
def test_first_layer_gradients_from_any_grad_link_layout(layout):
    """The first layer's node takes grad_h^T [H, M] in any layout, here with an odd M (577, the
    packed GEMM's K): contiguous (copied to an even row stride), a view of a padded buffer whose
    padding column holds NaN (read in place by the AMX tiles, which must not see that column),
    and a transpose of grad_h [M, H]."""
    dt = torch.bfloat16
    m, hidden, cin = 577, 72, 40
    x = torch.randn(m, cin, dtype=dt)
    w1 = torch.randn(hidden, cin, dtype=dt)
    g = torch.randn(hidden, m, dtype=dt)
    if layout == "padded":
        buf = torch.full((hidden, m + 1), float("nan"), dtype=dt)
        buf[:, :m] = g
        g = buf[:, :m]
    elif layout == "transposed":
        g = g.t().contiguous().t()
    gx, gw1 = torch.ops.mmfast._projector_backward_tail(g, x, w1, [True, True])
    gc = g.contiguous()  # torch's own bfloat16 mm of the padded view reads the NaN column
    check_like_torch(gx, gc.t() @ w1, gc.double().t() @ w1.double(), dt, "grad_x")
    check_like_torch(gw1, gc @ x, gc.double() @ x.double(), dt, "grad_w1")


LINK_BAD = [
    ("link", lambda x, w1, b1, w2, b2, link: (x, w1, b1, w2, b2, link[:-1])),
    ("link", lambda x, w1, b1, w2, b2, link: (x, w1, b1, w2, b2, link.double())),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_training_graph_ops_name_bad_arguments(device):
    x = torch.randn(4, 6, device=device)
    w1, b1, w2, b2 = (t.to(device) for t in make_weights(6, 10, 5, device="cpu",
                                                         dtype=torch.float32))
    link = torch.ops.mmfast._projector_link(x, w1)
    with pytest.raises(ValueError, match=r"projector: w1\b"):
        torch.ops.mmfast._projector_link(x, w1[:, :-1])
    for name, mutate in LINK_BAD:
        with pytest.raises(ValueError, match=rf"projector: {name}\b"):
            torch.ops.mmfast._projector_linked(*mutate(x, w1, b1, w2, b2, link))
    grad_link = torch.randn(10, 4, device=device)
    with pytest.raises(ValueError, match=r"projector_backward_tail: grad_link\b"):
        torch.ops.mmfast._projector_backward_tail(grad_link[:, :-1], x, w1, [True, True])
    with pytest.raises(ValueError, match=r"projector_backward_tail: w1\b"):
        torch.ops.mmfast._projector_backward_tail(grad_link, x, w1[:-1], [True, True])
    with pytest.raises(ValueError, match=r"projector_backward_tail: w1 is needed"):
        torch.ops.mmfast._projector_backward_tail(grad_link, x, None, [True, True])
    grad_out = torch.randn(4, 5, device=device)
    with pytest.raises(ValueError, match=r"projector_backward_head: w2\b"):
        torch.ops.mmfast._projector_backward_head(grad_out, x, torch.randn(4, 10, device=device),
                                                  w2[:, :-1], "none", [True] * 4)


def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: ops.projector(*a).square().sum(), fullgraph=True)
    # 21 tokens: one backward node; 6: two (first_layer_node_lowers_peak)
    for approximate, tokens in (("none", 7), ("tanh", 7), ("none", 2)):
        x = torch.randn(3, tokens, 24, requires_grad=True)
        w1, b1, w2, b2 = make_weights(24, 50, 20, device="cpu", dtype=torch.float32,
                                      requires_grad=True)
        compare_fwd_bwd(lambda *a: fn(*a), lambda *a: reference.projector(*a).square().sum(),
                        (x, w1, b1, w2, b2, approximate), torch.float32)


def _bad(x, w1, b1, w2, b2, approximate="none"):
    return ops.projector(x, w1, b1, w2, b2, approximate)


BAD = [
    ("w1", lambda x, w1, b1, w2, b2: (x, w1[:, :-1], b1, w2, b2)),
    ("w1", lambda x, w1, b1, w2, b2: (x, w1[0], b1, w2, b2)),
    ("w2", lambda x, w1, b1, w2, b2: (x, w1, b1, w2[:, :-1], b2)),
    ("b1", lambda x, w1, b1, w2, b2: (x, w1, b1[:-1], w2, b2)),
    ("b2", lambda x, w1, b1, w2, b2: (x, w1, b1, w2, b2[:-1])),
    ("b2", lambda x, w1, b1, w2, b2: (x, w1, b1, w2, b2[None])),
    ("w2", lambda x, w1, b1, w2, b2: (x, w1, b1, w2.double(), b2)),
    ("b1", lambda x, w1, b1, w2, b2: (x, w1, b1.half(), w2, b2)),
    ("x", lambda x, w1, b1, w2, b2: (x.int(), w1, b1, w2, b2)),
    ("x", lambda x, w1, b1, w2, b2: (x[0, 0], w1, b1, w2, b2)),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("name,mutate", BAD)
@pytest.mark.parametrize("trained", [False, True])
def test_bad_input_names_the_argument(device, name, mutate, trained):
    """trained: the floating inputs require grad (on CPU: the two-node training graph)."""
    x = torch.randn(4, 6, device=device)
    w1, b1, w2, b2 = make_weights(6, 10, 5, device="cpu", dtype=torch.float32)
    args = mutate(x, *(t.to(device) for t in (w1, b1, w2, b2)))
    if trained:
        args = [a.detach().requires_grad_() if a.is_floating_point() else a for a in args]
    with pytest.raises((ValueError, RuntimeError), match=rf"projector: {name}\b"):
        _bad(*args)


def test_bad_approximate():
    x = torch.randn(4, 6)
    w1, b1, w2, b2 = make_weights(6, 10, 5, device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="approximate"):
        _bad(x, w1, b1, w2, b2, "erf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_kernels_in_interpreter(dtype, approximate, bias):
    """The Triton GEMM with its epilogues (forward, recompute-backward), on CPU tensors."""
    from mmfast.kernels import projector as kernels

    tanh = approximate == "tanh"
    x = torch.randn(2, 19, 40, dtype=dtype)
    w1, b1, w2, b2 = make_weights(40, 45, 33, device="cpu", dtype=dtype, bias=bias)
    out, h = kernels.projector_forward(x, w1, b1, w2, b2, tanh)
    args64 = [t.double() if t is not None else None for t in (x, w1, b1, w2, b2)]
    check_like_torch(out, reference.projector(x, w1, b1, w2, b2, approximate),
                     reference.projector(*args64, approximate), dtype, "triton output")
    torch.testing.assert_close(h, F.linear(x, w1, b1), atol=0.02 if dtype == torch.bfloat16 else 1e-5, rtol=0.02 if dtype == torch.bfloat16 else 1e-5)
    g = torch.randn_like(out)
    for mask in ([True] * 5, [False, False, False, True, True], [False, True, True, False, False]):
        ours = kernels.projector_backward(g, x, h, w1, w2, tanh, mask)
        cpu = torch.ops.mmfast.projector_backward(g, x, h, w1, w2, approximate, mask)
        leaves = [t.detach().double().requires_grad_() for t in (x, w1)] + [
            h.detach().double()[..., 0].new_zeros(45).requires_grad_(), w2.detach().double().requires_grad_(),
            torch.zeros(33, dtype=torch.float64, requires_grad=True)]
        # float64 gradients with the same stored h: h = x w1^T + b1 is rebuilt as
        # x w1^T + (h - x w1^T) so that d/db1 flows through b1's zero.
        x64, w164, db1, w264, db2 = leaves
        h64 = h.double() + (F.linear(x64, w164) - F.linear(x64, w164).detach()) + db1
        out64 = F.linear(F.gelu(h64, approximate=approximate), w264) + db2
        out64.backward(g.double())
        for i, (a, b, leaf) in enumerate(zip(ours, cpu, leaves)):
            if not mask[i]:
                assert a.numel() == 0
                continue
            check_like_torch(a, b, leaf.grad, dtype, f"triton grad {i} mask {mask}")


AOT_SCRIPT = """
from mmfast.kernels import aot
from mmfast.kernels import projector as kernels
spec = kernels._gemm_spec(("bf16",), 1, True, False, True, False, False)
for cc in (80, 90):
    dtype, constexprs, warps, stages = next(spec.configs(cc))
    r = aot.compile_for(spec, cc, dtype, constexprs, warps, stages)
    print(cc, r.shared, aot.SHARED_LIMIT[cc], r.has_mma, r.has_wgmma)
"""


@pytest.mark.aot
def test_triton_gemm_compiles_to_tensor_cores():
    """sm_90: wgmma; sm_80: mma.sync; shared memory within the architecture's limit. In a
    subprocess: this process runs Triton in interpreter mode, which cannot compile."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = {int(line.split()[0]): line.split()[1:] for line in run.stdout.splitlines()}
    for cc, (shared, limit, mma, wgmma) in lines.items():
        assert int(shared) <= int(limit)
        assert (wgmma if cc == 90 else mma) == "True", f"sm_{cc}: no tensor-core instructions"
    assert sorted(lines) == [80, 90]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_cuda_backends(backend, dtype, approximate):
    x = torch.randn(3, 97, 64, device="cuda", dtype=dtype, requires_grad=True)
    w1, b1, w2, b2 = make_weights(64, 256, 128, device="cuda", dtype=dtype, requires_grad=True)
    with mmfast.backend(backend):
        compare_fwd_bwd(ops.projector, reference.projector, (x, w1, b1, w2, b2, approximate), dtype)
    assert mmfast.last_choice("projector") == ("cublaslt" if backend == "cuda" else "triton")


def _bf16_ulp(v: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of bfloat16 at each value of v (float64)."""
    exponent = torch.floor(torch.log2(v.abs().clamp_min(2.0**-126)))
    return torch.exp2(exponent - 7)


def _gelu_and_grad64(h: torch.Tensor, approximate: str):
    """gelu(h) and gelu'(h) in float64, by torch and its autograd."""
    h = h.detach().requires_grad_()
    gelu = F.gelu(h, approximate=approximate)
    (grad,) = torch.autograd.grad(gelu.sum(), h)
    return gelu.detach(), grad


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bfloat16_gelu_on_every_input(approximate):
    """Every finite bfloat16 value as a pre-activation: x = I and w2 = I make h = w1^T and
    out = gelu(h) exactly, and with grad_out = 1 dw1 = gelu'(w1), each through the epilogues
    that compute them (512 tokens: the packed backward with the vdpbf16ps tiles). Each output is
    within one bfloat16 unit in the last place of the float64 value or 1e-6 of it (the far
    negative tail, |gelu| < 6e-8, where float32 GELUs are accurate only absolutely; subnormal
    inputs are read as zero by the dot-product instructions). Outside that tail (~21500
    inputs), at most 0.1% differ from the correctly rounded value at all (measured: at most 3;
    ATen's bfloat16 GELU: 159 exact, 14 tanh)."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.bfloat16)
    values = torch.where(values.isfinite(), values, torch.zeros((), dtype=torch.bfloat16))
    w1 = values.reshape(128, 512).clone().requires_grad_()
    x = torch.eye(512, dtype=torch.bfloat16)
    w2 = torch.eye(128, dtype=torch.bfloat16)
    out = ops.projector(x, w1, None, w2, None, approximate)
    out.backward(torch.ones_like(out))
    h = w1.detach().double().t()
    h = torch.where(h.abs() < 2.0**-126, torch.zeros_like(h), h)  # read as zero
    gelu, gelu_grad = _gelu_and_grad64(h, approximate)
    expected = {"gelu": (out.double(), gelu), "gelu'": (w1.grad.double().t(), gelu_grad)}
    for name, (got, exact) in expected.items():
        rounded = exact.to(torch.bfloat16).double()
        off = (got - rounded).abs()
        bad = off > _bf16_ulp(exact) + 1e-6
        assert not bad.any(), (name, h[bad][:8], got[bad][:8], exact[bad][:8])
        body = exact.abs() > 1e-6
        assert (off[body] > 0).double().mean() <= 0.001, (name, (off[body] > 0).sum().item())


def test_gelu_table_matches_its_generator():
    """csrc/cpu/vec/gelu_table.h holds the tables tools/gelu_table.py fits."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.join(root, "tools"))
    try:
        import gelu_table
    finally:
        sys.path.pop(0)
    with open(os.path.join(root, "csrc", "cpu", "vec", "gelu_table.h")) as f:
        header = f.read()
    fitted = gelu_table.cpp()
    # The layout must match exactly; the values to one float32 ulp, because LAPACK's least
    # squares rounds differently on different CPUs (4 of 512 values moved by an ulp between
    # the Zen 4 and Sapphire Rapids machines).
    number = r"-?\d\.\d+e[-+]\d+f"
    start = header.find(fitted.split("{", 1)[0])
    assert start >= 0, "gelu_table.h lost its first table"
    stored = header[start:start + len(fitted)]
    assert re.sub(number, "#", stored) == re.sub(number, "#", fitted)
    got = torch.tensor([float(v[:-1]) for v in re.findall(number, stored)], dtype=torch.float32)
    want = torch.tensor([float(v[:-1]) for v in re.findall(number, fitted)], dtype=torch.float32)
    ulp = torch.nextafter(want.abs(), torch.tensor(math.inf)) - want.abs()
    assert ((got - want).abs() <= ulp).all(), (got - want).abs().div(ulp).max()
