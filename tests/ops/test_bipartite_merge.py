import os
import subprocess
import sys

import pytest
import torch

import mmfast
from mmfast import reference
from tests.helpers import (DTYPES, assert_close, assert_pytest_passes, cpu_has_avx512,
                           noncontiguous, sample_inputs, tol)


def _ref64(x, metric, r, size=None, protect_first=False):
    """Reference in float64 (values) with the same choice of tokens."""
    return reference.bipartite_merge(x.detach().double(), metric, r, size=size,
                                     protect_first=protect_first)


def _check_against_reference(x, metric, r, **kwargs):
    merged, merged_size, dest = mmfast.ops.bipartite_merge(x, metric, r, **kwargs)
    ref_merged, ref_size, ref_dest = _ref64(x, metric, r, **kwargs)
    b, n, c = x.shape
    assert merged.shape == (b, n - r, c) and merged.dtype == x.dtype
    assert merged_size.shape == (b, n - r) and merged_size.dtype == torch.float32
    assert dest.shape == (b, n) and dest.dtype == torch.int64
    assert torch.equal(dest, ref_dest), f"different tokens merged: {(dest != ref_dest).nonzero()[:5]}"
    atol, rtol = tol(x.dtype)
    assert_close(merged, ref_merged, atol=atol, rtol=rtol, name="merged")
    assert_close(merged_size, ref_size, atol=1e-6, rtol=1e-6, name="merged_size")
    return merged, merged_size, dest


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_samples_match_reference(dtype):
    for s in sample_inputs("bipartite_merge", dtype=dtype):
        _check_against_reference(*s.args, **s.kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [577, 576, 2880])
def test_issue_shapes(n, dtype):
    """N odd and even, r in {0, 1, 16, N // 2}, with size and with a protected CLS token."""
    x = torch.randn(2, n, 8, dtype=dtype)
    metric = torch.randn(2, n, 24, dtype=dtype)
    size = torch.randint(1, 9, (2, n)).to(dtype)
    for r in (0, 1, 16, n // 2):
        _check_against_reference(x, metric, r)
        _check_against_reference(x, metric, r, size=size)
        _check_against_reference(x, metric, min(r, (n - 1) // 2), protect_first=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [100, 4500])
def test_duplicate_tokens_break_ties_by_lower_index(n, dtype):
    # A tokens repeat 4 directions and B tokens 5 others: every A token has several B tokens
    # of exactly equal similarity, and A tokens of one direction share their score exactly
    # (the same arithmetic on the same values). The lower index must win every tie. The
    # directions of A and B differ, so scores of different directions are not near-ties.
    # N = 4500: equal B tokens also sit in different panels of the CPU kernel's GEMM (2048 B
    # tokens each).
    dirs_a, dirs_b = torch.randn(4, 16, dtype=dtype), torch.randn(5, 16, dtype=dtype)
    pick_a = torch.randint(0, 4, (3, (n + 1) // 2))
    pick_b = torch.randint(0, 5, (3, n // 2))
    metric = torch.empty(3, n, 16, dtype=dtype)
    metric[:, 0::2] = dirs_a[pick_a]
    metric[:, 1::2] = dirs_b[pick_b]
    x = torch.randn(3, n, 6, dtype=dtype)
    for r in (1, 7, n // 4, n // 2):
        _check_against_reference(x, metric, r)
    # With every A token merged (r = N / 2): each went to the first B token of its best direction.
    _, _, dest = mmfast.ops.bipartite_merge(x, metric, n // 2)
    a = dirs_a.double() / dirs_a.double().norm(dim=-1, keepdim=True)
    b = dirs_b.double() / dirs_b.double().norm(dim=-1, keepdim=True)
    best_dir = (a @ b.T).argmax(1)  # [4]
    for s in range(3):
        for i in range(pick_a.shape[1]):
            j = int((pick_b[s] == best_dir[pick_a[s, i]]).int().argmax())
            if (pick_b[s] == best_dir[pick_a[s, i]]).any():
                assert dest[s, 2 * i] == dest[s, 2 * j + 1]


def test_dest_round_trip_gives_group_means():
    x = torch.randn(2, 301, 10)
    metric = torch.randn(2, 301, 12)
    size = torch.rand(2, 301) + 0.5
    merged, merged_size, dest = mmfast.ops.bipartite_merge(x, metric, 100, size=size)
    # Independently: sum size * x over each dest group.
    sums = torch.zeros(2, 201, 10, dtype=torch.float64).scatter_add_(
        1, dest[..., None].expand(-1, -1, 10), (x * size[..., None]).double())
    weights = torch.zeros(2, 201, dtype=torch.float64).scatter_add_(1, dest, size.double())
    unmerged = merged.gather(1, dest[..., None].expand(-1, -1, 10))
    expected = (sums / weights[..., None]).gather(1, dest[..., None].expand(-1, -1, 10))
    assert_close(unmerged, expected, atol=1e-5, rtol=1e-5, name="unmerged")
    assert_close(merged_size, weights, atol=1e-5, rtol=1e-5, name="merged_size")
    # Every output row is used; B (odd) tokens always survive, in their input order.
    for b in range(2):
        counts = torch.bincount(dest[b], minlength=201)
        assert counts.shape == (201,) and (counts >= 1).all()
        assert (dest[b, 1::2].diff() > 0).all()


def test_protect_first_keeps_token_zero_alone():
    x = torch.randn(4, 97, 8)
    metric = torch.randn(4, 97, 8)
    metric[:, 0] = metric[:, 1]  # token 0 would merge first without protection
    _, _, dest = mmfast.ops.bipartite_merge(x, metric, 48, protect_first=True)
    assert (dest[:, 0] == 0).all() and ((dest == 0).sum(1) == 1).all()
    _, _, dest = mmfast.ops.bipartite_merge(x, metric, 48)
    assert (dest[:, 0] == dest[:, 1]).all()


def test_zero_metric_rows_have_similarity_zero():
    x = torch.randn(1, 40, 4)
    metric = torch.randn(1, 40, 8)
    metric[:, 3] = 0
    metric[:, 10] = 0
    _check_against_reference(x, metric, 12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_matches_reference(dtype):
    for s in sample_inputs("bipartite_merge", dtype=dtype, requires_grad=True):
        x, metric, r = s.args
        merged, _, _ = mmfast.ops.bipartite_merge(x, metric, r, **s.kwargs)
        grad = torch.randn_like(merged)
        merged.backward(grad)
        x64 = x.detach().double().requires_grad_()
        ref, _, _ = reference.bipartite_merge(x64, metric, r, **s.kwargs)
        ref.backward(grad.double())
        atol, rtol = tol(dtype)
        assert_close(x.grad, x64.grad, atol=atol, rtol=rtol, name=f"dx {s}")


def test_opcheck():
    op = torch.ops.mmfast.bipartite_merge.default
    for s in sample_inputs("bipartite_merge", dtype=torch.float32, requires_grad=True):
        torch.library.opcheck(op, s.args, s.kwargs)


def test_torch_compile_forward_backward():
    def f(x, metric, size):
        merged, merged_size, dest = mmfast.ops.bipartite_merge(x, metric, 20, size=size,
                                                               protect_first=True)
        return (merged * merged_size[..., None]).sum()

    x = torch.randn(2, 81, 12, requires_grad=True)
    metric = torch.randn(2, 81, 16)
    size = torch.rand(2, 81) + 1
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, metric, size)
    (gx,) = torch.autograd.grad(out, x)
    x2 = x.detach().requires_grad_()
    (gx_eager,) = torch.autograd.grad(f(x2, metric, size), x2)
    assert_close(out, f(x, metric, size).detach(), atol=1e-4, rtol=1e-5)
    assert_close(gx, gx_eager, atol=1e-6, rtol=1e-6)


def test_noncontiguous_inputs():
    x = torch.randn(2, 99, 14)
    metric = torch.randn(2, 99, 10)
    a = mmfast.ops.bipartite_merge(noncontiguous(x), noncontiguous(metric), 30)
    b = mmfast.ops.bipartite_merge(x, metric, 30)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_deterministic():
    x = torch.randn(3, 577, 40)
    metric = torch.randn(3, 577, 32)
    first = mmfast.ops.bipartite_merge(x, metric, 200)
    for _ in range(2):
        again = mmfast.ops.bipartite_merge(x, metric, 200)
        assert all(torch.equal(u, v) for u, v in zip(first, again))


@pytest.mark.parametrize("bad, match", [
    (dict(r=41), "r must be in"),
    (dict(r=-1), "r must be in"),
    (dict(r=40, protect_first=True, x=torch.randn(2, 80, 6), metric=torch.randn(2, 80, 8)),
     "r must be in"),
    (dict(metric=torch.randn(2, 80, 8)), "metric must have shape"),
    (dict(metric=torch.randn(2, 81)), "metric must have shape"),
    (dict(x=torch.randn(2, 81)), "x must have shape"),
    (dict(x=torch.randint(0, 5, (2, 81, 6))), "x must be float32"),
    (dict(metric=torch.randn(2, 81, 8, dtype=torch.float64)), "metric dtype"),
    (dict(size=torch.ones(2, 80)), "size must have shape"),
    (dict(size=torch.ones(2, 81, dtype=torch.int32)), "size must be float32"),
])
def test_bad_input_names_the_argument(bad, match):
    args = dict(x=torch.randn(2, 81, 6), metric=torch.randn(2, 81, 8), r=10)
    args.update(bad)
    kwargs = {k: args.pop(k) for k in ("size", "protect_first") if k in args}
    with pytest.raises((ValueError, RuntimeError), match=match):
        mmfast.ops.bipartite_merge(args["x"], args["metric"], args["r"], **kwargs)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("r", [0, 5])
def test_non_finite_metric_is_an_error(value, r):
    metric = torch.randn(2, 81, 8)
    metric[1, 17, 3] = value
    with pytest.raises(ValueError, match=r"metric has a non-finite value at \[1, 17, 3\]"):
        mmfast.ops.bipartite_merge(torch.randn(2, 81, 6), metric, r)


def test_large_finite_metric_is_not_mistaken_for_non_finite():
    # The float32 sum of squares overflows; the norm is then taken in float64.
    metric = torch.randn(1, 33, 8)
    x = torch.randn(1, 33, 4)
    big = metric.clone()
    big[0, 5] *= 1e19
    _check_against_reference(x, big, 10)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_path_in_interpreter(dtype):
    """The CUDA path (Triton matching, torch selection, Triton segmented merge and backward)
    run by the Triton interpreter on CPU tensors."""
    import importlib

    op = importlib.import_module("mmfast.ops.bipartite_merge")

    for b, n, c, cm, r, sized, protect in [(2, 67, 9, 20, 30, True, True), (1, 40, 4, 70, 20, False, False),
                                           (2, 9, 3, 5, 0, True, False)]:
        x = torch.randn(b, n, c, dtype=dtype)
        metric = torch.randn(b, n, cm, dtype=dtype)
        size = torch.randint(1, 4, (b, n)).to(dtype) if sized else None
        merged, merged_size, dest = op._run_triton(x, metric, r, size, protect)
        ref, ref_size, ref_dest = _ref64(x, metric, r, size=size, protect_first=protect)
        assert torch.equal(dest, ref_dest)
        atol, rtol = tol(dtype)
        assert_close(merged, ref, atol=atol, rtol=rtol, name="merged")
        assert_close(merged_size, ref_size, atol=1e-6, rtol=1e-6, name="merged_size")
        grad = torch.randn_like(merged)
        dx = op._run_triton_backward(grad, dest, size, merged_size)
        assert_close(dx, torch.ops.mmfast.bipartite_merge_backward(grad, dest, size, merged_size),
                     atol=atol, rtol=rtol, name="dx")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_reference(backend, dtype):
    with mmfast.backend(backend):
        for s in sample_inputs("bipartite_merge", device="cuda", dtype=dtype, requires_grad=True):
            x, metric, r = s.args
            merged, merged_size, dest = mmfast.ops.bipartite_merge(x, metric, r, **s.kwargs)
            kwargs = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in s.kwargs.items()}
            ref, ref_size, ref_dest = _ref64(x.cpu(), metric.cpu(), r, **kwargs)
            assert torch.equal(dest.cpu(), ref_dest), s
            atol, rtol = tol(dtype)
            assert_close(merged, ref, atol=atol, rtol=rtol, name=f"merged {s}")
            assert_close(merged_size, ref_size, atol=1e-6, rtol=1e-6, name=f"size {s}")
            merged.backward(torch.ones_like(merged))
            x64 = x.detach().cpu().double().requires_grad_()
            reference.bipartite_merge(x64, metric.cpu(), r, **kwargs)[0].sum().backward()
            assert_close(x.grad, x64.grad, atol=atol, rtol=rtol, name=f"dx {s}")


@pytest.mark.parametrize("nb", [11, 2200])
def test_near_ties_below_bfloat16_resolution(nb):
    # Directions on a circle: 11 B tokens 0.02 rad apart, each of 11 A tokens a distinct
    # small angle past one of them. Scores differ by ~1e-5: far above float32 rounding, far
    # below what a bfloat16 or int8 GEMM resolves. The CPU kernel's approximate GEMM only
    # shortlists candidates; the exact re-scoring must still make ToMe's choice (best B, then
    # ranking of the A tokens). With nb = 2200 the 11 B tokens are spread over the CPU
    # kernel's two GEMM panels (2048 B tokens each), among tokens in other dimensions
    # (similarity 0 to the circle): some A tokens find their best match in the second.
    near = 11
    theta_b = torch.arange(near, dtype=torch.float64) * 0.02
    theta_a = theta_b[torch.randperm(near)] + (torch.arange(near) + 1) * 0.02 / 30
    metric = torch.zeros(3, 2 * nb, 64, dtype=torch.float64)
    metric[:, :, 2:] = torch.randn(3, 2 * nb, 62, dtype=torch.float64)
    rows_a = 2 * torch.arange(near)
    rows_b = 2 * torch.linspace(0, nb - 1, near).round().long() + 1
    for rows, theta in ((rows_a, theta_a), (rows_b, theta_b)):
        metric[:, rows, 2:] = 0
        metric[:, rows, 0], metric[:, rows, 1] = theta.cos(), theta.sin()
    metric = (metric * (torch.rand(3, 2 * nb, 1, dtype=torch.float64) + 0.5)).float()
    x = torch.randn(3, 2 * nb, 5)
    for r in (1, 4, near, nb):
        _check_against_reference(x, metric, r)


def _check_choice_up_to_rounding(x, metric, r, slack):
    """Where float64 similarities tie to within float32 rounding, any of the tied tokens is a
    correct choice: every merged A token went to a B token within `slack` of its best match,
    the merged A tokens' best scores are within `slack` of the top r, and the values are the
    group means of that choice."""
    merged, _, dest = mmfast.ops.bipartite_merge(x, metric, r)
    m = torch.nn.functional.normalize(metric.double(), dim=-1)
    sim = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)  # [B, Na, Nb]
    best = sim.amax(-1)
    for s in range(x.shape[0]):
        b_of_row = {int(dest[s, 2 * j + 1]): j for j in range(x.shape[1] // 2)}
        a_dest = dest[s, 0::2].tolist()
        is_merged = torch.tensor([d in b_of_row for d in a_dest])
        assert int(is_merged.sum()) == r
        for i in is_merged.nonzero().flatten().tolist():
            assert sim[s, i, b_of_row[a_dest[i]]] >= best[s, i] - slack, (s, i)
        if 0 < r < len(a_dest):
            assert best[s][is_merged].min() >= best[s][~is_merged].max() - slack, s
    want = torch.zeros(merged.shape, dtype=torch.float64)
    for s in range(x.shape[0]):
        counts = torch.bincount(dest[s], minlength=merged.shape[1]).double()
        want[s].index_add_(0, dest[s], x[s].double()).div_(counts[:, None])
    atol, rtol = tol(x.dtype)
    assert_close(merged, want, atol=atol, rtol=rtol, name="merged")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_outlier_channels_keep_the_exact_choice(dtype):
    # A few channels 300x larger than the rest (as in real ViT features) make the rounding of
    # an 8-bit copy of the metric coarse for every other channel: the shortlist grows, and the
    # choice must stay exact. The large channel makes many cosines agree to ~1e-7, which is
    # float32's resolution: there, either token of a tie is ToMe's choice.
    metric = torch.randn(2, 301, 45)
    metric[:, ::3, 7] *= 300
    metric[:, 1::5, 30] *= -300
    x = torch.randn(2, 301, 6)
    for r in (1, 75, 150):
        _check_choice_up_to_rounding(x.to(dtype), metric.to(dtype), r, slack=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tiny_metric_rows_are_an_error(dtype):
    # A nonzero row of norm below 2^-50 would lose its float32 similarities to underflow (the
    # CPU kernel says so instead); an exactly zero row is fine (similarity 0 to all).
    metric = torch.randn(2, 41, 64)
    metric[1, 6] *= 2.0 ** -90
    with pytest.raises(ValueError, match=r"metric row \[1, 6\] has norm"):
        mmfast.ops.bipartite_merge(torch.randn(2, 41, 5, dtype=dtype), metric.to(dtype), 3)


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_each_isa_build(isa):
    """The generic and AVX2 builds of the row loops (forced by MMFAST_CPU_ISA) make the same
    choice and values as the reference; the rest of the suite runs the best build. These
    builds shortlist with a bfloat16 GEMM on AVX-512 CPUs (the AVX512 build with int8 where
    the CPU has VNNI): on a rounded copy (odd Cm), or reading a bfloat16 metric in place (even
    Cm); without AVX-512 with a float32 GEMM (on a widened copy unless the metric is
    float32)."""
    code = (
        "import torch, mmfast\n"
        f"assert mmfast.cpu_isa() == '{isa}', mmfast.cpu_isa()\n"
        "torch.manual_seed(0)\n"
        "for dt, cm in [(d, c) for d in (torch.float32, torch.bfloat16, torch.float16) for c in (45, 64)]:\n"
        "  x = torch.randn(2, 301, 37, dtype=dt); m = torch.randn(2, 301, cm, dtype=dt)\n"
        "  s = torch.rand(2, 301) + 0.5\n"
        "  out, size, dest = mmfast.ops.bipartite_merge(x, m, 120, size=s)\n"
        "  ref, rsize, rdest = mmfast.reference.bipartite_merge(x.double(), m, 120, size=s)\n"
        "  assert torch.equal(dest, rdest), dt\n"
        "  tol = 1e-5 if dt == torch.float32 else 2e-2\n"
        "  assert torch.allclose(out.double(), ref, atol=tol, rtol=tol), dt\n"
        "  g = torch.randn_like(out)\n"
        "  dx = torch.ops.mmfast.bipartite_merge_backward(g, dest, s, size)\n"
        "  want = g.double().gather(1, dest[..., None].expand(-1, -1, 37)) * (s / size.gather(1, dest))[..., None]\n"
        "  assert torch.allclose(dx.double(), want, atol=tol, rtol=tol), dt\n"
        "from tests.ops import test_bipartite_merge as t\n"
        "t.test_near_ties_below_bfloat16_resolution(11)\n"
        "t.test_near_ties_below_bfloat16_resolution(2200)\n"
        "for dt in (torch.float32, torch.bfloat16, torch.float16):\n"
        "  t.test_outlier_channels_keep_the_exact_choice(dt)\n"
    )
    env = dict(os.environ, MMFAST_CPU_ISA=isa)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]


_PASS_NAMES = {"int8": "int8 brgemm", "bf16": "bfloat16 brgemm", "f32": "float32 brgemm"}


def test_cpu_merge_gemm_path_follows_the_cpu():
    """The first pass runs int8 brgemm in the AVX512 build on a CPU with VNNI, bfloat16 brgemm
    on other AVX-512 CPUs, float32 brgemm without AVX-512 (ATen has no bfloat16 brgemm there:
    it raised an error on a Zen 3); MMFAST_CPU_MERGE_GEMM=int8|bf16|f32 overrides."""
    forced = os.environ.get("MMFAST_CPU_MERGE_GEMM", "auto")
    if forced != "auto":
        expected = f"{_PASS_NAMES[forced]} (MMFAST_CPU_MERGE_GEMM={forced})"
    elif mmfast.cpu_isa() == "avx512" and torch.cpu.get_capabilities().get("avx512_vnni"):
        expected = "int8 brgemm (AVX512-VNNI)"
    elif cpu_has_avx512():
        expected = "bfloat16 brgemm (AVX-512)"
    else:
        expected = "float32 brgemm (no AVX-512)"
    assert mmfast.cpu_merge_gemm() == expected


@pytest.mark.parametrize("first_pass", ["bf16", "f32"])
def test_other_first_passes(first_pass):
    """The first passes this CPU does not take by default (forced by MMFAST_CPU_MERGE_GEMM)
    choose the exact tokens too: every dtype, odd Cm (a copy or a widened metric), near ties
    below bfloat16's resolution, outlier channels."""
    if mmfast.cpu_merge_gemm().startswith(_PASS_NAMES[first_pass]):
        pytest.skip("this CPU's default: the rest of the suite runs it")
    if first_pass == "bf16" and not cpu_has_avx512():
        pytest.skip("ATen's bfloat16 brgemm needs AVX-512")
    base = "tests/ops/test_bipartite_merge.py::"
    tests = [base + "test_cpu_merge_gemm_path_follows_the_cpu", base + "test_issue_shapes",
             base + "test_duplicate_tokens_break_ties_by_lower_index",
             base + "test_near_ties_below_bfloat16_resolution",
             base + "test_outlier_channels_keep_the_exact_choice",
             base + "test_noncontiguous_inputs", base + "test_samples_match_reference"]
    assert_pytest_passes(tests, None, MMFAST_CPU_MERGE_GEMM=first_pass)
