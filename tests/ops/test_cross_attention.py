"""mmfast.ops.cross_attention on CPU against the float64 reference, open_flamingo's masking,
opcheck, torch.compile, determinism and argument errors."""

import os

import pytest
import torch

import mmfast
from mmfast import reference as R
from mmfast.reference.cross_attention import allowed_mask
from tests.helpers import (DTYPES, assert_attention_close, assert_close, assert_pytest_passes,
                           cpu_has_avx512, sample_inputs)

# Absolute error floors of the attention error rule, per dtype (outputs and gradients are O(1)).
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _ref(args, kwargs, dtype):
    """(out, lse) of the reference on copies of args in `dtype`, with grads enabled."""
    leaves = [a.detach().to(dtype).requires_grad_() for a in args]
    out, lse = R.cross_attention(*leaves, return_lse=True, **kwargs)
    return leaves, out, lse


def _check_lse(lse, lse64, name="lse"):
    assert torch.equal(torch.isinf(lse), torch.isinf(lse64)), f"{name}: -inf rows differ"
    finite = torch.isfinite(lse64)
    assert_close(lse[finite], lse64[finite], atol=1e-4, rtol=1e-5, name=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_gradients_match_reference(dtype):
    for s in sample_inputs("cross_attention", dtype=dtype, requires_grad=True):
        out, lse = mmfast.ops.cross_attention(*s.args, return_lse=True, **s.kwargs)
        leaves64, out64, lse64 = _ref(s.args, s.kwargs, torch.float64)
        leaves_t, out_t, _ = _ref(s.args, s.kwargs, dtype)
        assert out.dtype == dtype and lse.dtype == torch.float32
        assert_attention_close(out, out_t, out64, floor=FLOOR[dtype], name=f"{s.name}: out")
        _check_lse(lse, lse64, f"{s.name}: lse")
        grad = torch.randn_like(out64)
        ours = torch.autograd.grad(out, s.args, grad.to(dtype))
        g64 = torch.autograd.grad(out64, leaves64, grad)
        gt = torch.autograd.grad(out_t, leaves_t, grad.to(dtype))
        for name, a, b, c in zip("qkv", ours, gt, g64):
            assert a.shape == c.shape
            assert_attention_close(a, b, c, floor=FLOOR[dtype], name=f"{s.name}: d{name}")


def test_lse_gradient():
    s = sample_inputs("cross_attention", requires_grad=True)[3]
    out, lse = mmfast.ops.cross_attention(*s.args, return_lse=True, **s.kwargs)
    leaves64, out64, lse64 = _ref(s.args, s.kwargs, torch.float64)
    w = torch.randn_like(lse64).masked_fill(torch.isinf(lse64), 0)
    ours = torch.autograd.grad((lse.masked_fill(torch.isinf(lse), 0) * w).sum(), s.args)
    ref = torch.autograd.grad((lse64.masked_fill(torch.isinf(lse64), 0) * w).sum(), leaves64[:2])
    for a, b in zip(ours, ref):
        assert_close(a, b, atol=1e-5, rtol=1e-4, name="grad through lse")
    assert (ours[2] == 0).all()  # lse does not depend on v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_allowed_key_gives_exact_zero_and_neg_inf(dtype):
    q = torch.randn(3, 5, 2, 40, dtype=dtype, requires_grad=True)
    k = torch.randn(3, 6, 2, 40, dtype=dtype, requires_grad=True)
    v = torch.randn(3, 6, 2, 40, dtype=dtype, requires_grad=True)
    kv_lens = torch.tensor([0, 6, 6])
    q_media = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 2, 2, 1], [3, 3, 3, 3, 3]])
    kv_media = torch.tensor([[1] * 6, [2, 2, 2, 0, 0, 0], [1, 1, 2, 2, 0, 0]])
    for mode in ("immediate", "previous"):
        out, lse = mmfast.ops.cross_attention(q, k, v, kv_lens=kv_lens, q_media=q_media,
                                              kv_media=kv_media, media_mode=mode, return_lse=True)
        none = ~allowed_mask(3, 5, 6, kv_lens=kv_lens, q_media=q_media, kv_media=kv_media,
                               media_mode=mode).any(-1)  # [B, Lq]
        assert none[0].all() and none[1, :2].all()
        assert (out[none] == 0).all()
        assert torch.isneginf(lse.transpose(1, 2)[none]).all()
        assert torch.isfinite(lse.transpose(1, 2)[~none]).all()
        grads = torch.autograd.grad(out.float().sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)
        assert (grads[0][none] == 0).all() and (grads[1][0] == 0).all()


def test_empty_key_set():
    q = torch.randn(2, 3, 2, 32)
    k = torch.randn(2, 0, 1, 32)
    out, lse = mmfast.ops.cross_attention(q, k, k, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_extreme_magnitudes(dtype):
    # |q·k| * scale ~ 1e4: would overflow float16 scores; must stay finite and exact-ish.
    q = (torch.randn(1, 9, 2, 64) * 40).to(dtype).requires_grad_()
    k = (torch.randn(1, 70, 2, 64) * 40).to(dtype).requires_grad_()
    v = torch.randn(1, 70, 2, 64, dtype=dtype, requires_grad=True)
    s = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()).abs().max() * 64 ** -0.5
    assert s > 3e3
    out = mmfast.ops.cross_attention(q, k, v, kv_lens=torch.tensor([50]))
    _, out64, _ = _ref((q, k, v), {"kv_lens": torch.tensor([50])}, torch.float64)
    assert torch.isfinite(out).all()
    assert_close(out, out64, atol=2e-2, rtol=2e-2)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


def _open_flamingo_attention(q, k, v, media_locations, n_per_image, only_immediate):
    """open_flamingo's MaskedCrossAttention core (attention part, float64), on our layout:
    text_time = cumsum(media_locations); mask = eq/ge(text_time, media_time); masked logits get
    -max; text without a preceding image is zeroed in immediate mode."""
    text_time = media_locations.cumsum(dim=-1)                        # [B, Lq]
    n_images = len(n_per_image)
    media_time = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(n_per_image)])
    op = torch.eq if only_immediate else torch.ge
    mask = op(text_time[:, None, :, None], media_time[None, None, None, :])  # [B, 1, Lq, Lk]
    sim = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5
    sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    sim = sim - sim.amax(dim=-1, keepdim=True)
    attn = sim.softmax(dim=-1)
    if only_immediate:
        attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
    assert n_images == int(media_time.max())
    return torch.einsum("bhij,bjhd->bihd", attn, v), text_time


@pytest.mark.parametrize("mode", ["immediate", "previous"])
def test_open_flamingo_semantics(mode):
    # Two samples: text before the first image, three images of different sizes.
    media_locations = torch.zeros(2, 12, dtype=torch.bool)
    media_locations[0, [2, 5, 9]] = True
    media_locations[1, [0, 1, 11]] = True
    n_per_image = [4, 7, 2]
    q = torch.randn(2, 12, 2, 32, dtype=torch.float64)
    k = torch.randn(2, 13, 2, 32, dtype=torch.float64)
    v = torch.randn(2, 13, 2, 32, dtype=torch.float64)
    expected, text_time = _open_flamingo_attention(q, k, v, media_locations, n_per_image,
                                                   mode == "immediate")
    kv_media = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(n_per_image)])
    out = mmfast.ops.cross_attention(q.float(), k.float(), v.float(), q_media=text_time,
                                     kv_media=kv_media.expand(2, -1), media_mode=mode)
    # In "previous" mode open_flamingo lets text before any image attend uniformly to every
    # image (all logits equally masked); mmfast's contract gives such text 0 instead.
    defined = text_time > 0
    assert_close(out[defined], expected[defined], atol=1e-5, rtol=1e-5)
    assert (out[~defined] == 0).all()


def test_gqa_equals_repeated_kv_heads():
    q = torch.randn(2, 50, 6, 40)
    k = torch.randn(2, 30, 2, 40)
    v = torch.randn(2, 30, 2, 40)
    out = mmfast.ops.cross_attention(q, k, v)
    rep = mmfast.ops.cross_attention(q, k.repeat_interleave(3, 2), v.repeat_interleave(3, 2))
    assert_close(out, rep, atol=1e-6, rtol=1e-6)


def test_sorted_and_unsorted_queries_agree():
    # Block skipping depends on the media ids of a query tile; a permutation of the queries
    # must permute the output and nothing else.
    q = torch.randn(1, 300, 2, 64)
    k = torch.randn(1, 320, 2, 64)
    v = torch.randn(1, 320, 2, 64)
    qm = torch.sort(torch.randint(0, 6, (1, 300))).values
    km = torch.arange(5).repeat_interleave(64).add(1)[None]
    perm = torch.randperm(300)
    out = mmfast.ops.cross_attention(q, k, v, q_media=qm, kv_media=km)
    out_p = mmfast.ops.cross_attention(q[:, perm], k, v, q_media=qm[:, perm], kv_media=km)
    assert_close(out_p, out[:, perm], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_is_deterministic(dtype):
    s = sample_inputs("cross_attention", dtype=dtype, requires_grad=True)[3]
    runs = []
    for _ in range(2):
        out = mmfast.ops.cross_attention(*s.args, **s.kwargs)
        runs.append(torch.autograd.grad(out, s.args, torch.ones_like(out)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_opcheck():
    for s in sample_inputs("cross_attention", requires_grad=True):
        if s.args[0].shape[1] > 200:
            continue  # the big sample adds time, not coverage
        torch.library.opcheck(torch.ops.mmfast.cross_attention.default, s.args, s.kwargs)


def test_compile_fullgraph_forward_backward():
    s = sample_inputs("cross_attention", requires_grad=True)[4]

    def f(q, k, v, **kw):
        return mmfast.ops.cross_attention(q, k, v, **kw).square().sum()

    compiled = torch.compile(f, fullgraph=True)
    got = torch.autograd.grad(compiled(*s.args, **s.kwargs), s.args)
    want = torch.autograd.grad(f(*s.args, **s.kwargs), s.args)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _inputs():
    return torch.randn(2, 5, 4, 32), torch.randn(2, 7, 2, 32), torch.randn(2, 7, 2, 32)


BAD = [
    ("batch", lambda q, k, v: (q, k[:1], v[:1]), {}),
    ("head dim", lambda q, k, v: (q, k[..., :16], v[..., :16]), {}),
    ("multiple of the number of k heads", lambda q, k, v: (q[:, :, :3], k, v), {}),
    ("v must have the shape of k", lambda q, k, v: (q, k, v[:, :6]), {}),
    ("k dtype", lambda q, k, v: (q, k.double(), v), {}),
    ("q must be \\[B, Lq, Hq, D\\]", lambda q, k, v: (q[0], k, v), {}),
    ("kv_lens must be int32 or int64", lambda q, k, v: (q, k, v),
     {"kv_lens": torch.tensor([1.0, 2.0])}),
    ("kv_lens must have shape", lambda q, k, v: (q, k, v), {"kv_lens": torch.tensor([1, 2, 3])}),
    ("kv_lens\\[1\\] = 8 is out of range", lambda q, k, v: (q, k, v),
     {"kv_lens": torch.tensor([1, 8])}),
    ("kv_lens\\[0\\] = -1 is out of range", lambda q, k, v: (q, k, v),
     {"kv_lens": torch.tensor([-1, 2])}),
    ("q_media must have shape", lambda q, k, v: (q, k, v),
     {"q_media": torch.ones(2, 4, dtype=torch.long), "kv_media": torch.ones(2, 7, dtype=torch.long)}),
    ("kv_media must be int32 or int64", lambda q, k, v: (q, k, v),
     {"q_media": torch.ones(2, 5, dtype=torch.long), "kv_media": torch.ones(2, 7)}),
    ("q_media and kv_media must be given together", lambda q, k, v: (q, k, v),
     {"q_media": torch.ones(2, 5, dtype=torch.long)}),
    ("q_media values", lambda q, k, v: (q, k, v),
     {"q_media": -torch.ones(2, 5, dtype=torch.long), "kv_media": torch.ones(2, 7, dtype=torch.long)}),
    ("media_mode must be", lambda q, k, v: (q, k, v), {"media_mode": "nearest"}),
]


@pytest.mark.parametrize("match,make,kwargs", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(match, make, kwargs):
    args = make(*_inputs())
    with pytest.raises((ValueError, RuntimeError), match=match):
        mmfast.ops.cross_attention(*args, **kwargs)
    if "out of range" in match or "values" in match:
        return  # value checks need the data: not done by the fake kernel
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) for a in args]
        fake_kw = {n: mode.from_tensor(t) if torch.is_tensor(t) else t for n, t in kwargs.items()}
        with pytest.raises((ValueError, RuntimeError), match=match):
            mmfast.ops.cross_attention(*fake, **fake_kw)


# --- Triton kernels, in the interpreter on CPU tensors (tiny shapes: it is slow) ----------------

TRITON_CASES = [
    ("plain gqa d40", (2, 21, 19, 4, 2, 40), {}),
    ("ragged with empty sample", (2, 9, 23, 2, 1, 72), {"kv_lens": torch.tensor([0, 17])}),
    ("immediate", (2, 21, 19, 2, 2, 32), "immediate"),
    ("previous", (2, 21, 19, 2, 1, 40), "previous"),
]


def _triton_case(shape, masks):
    b, lq, lk, hq, hk, d = shape
    if isinstance(masks, str):
        masks = {"q_media": torch.randint(0, 3, (b, lq)), "kv_media": torch.randint(0, 3, (b, lk)),
                 "media_mode": masks}
    return masks


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,shape,masks", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_interpreter_matches_reference(dtype, name, shape, masks):
    from mmfast.ops.cross_attention import (triton_cross_attention, triton_cross_attention_backward,
                                            triton_key_attention_mass)
    b, lq, lk, hq, hk, d = shape
    masks = _triton_case(shape, masks)
    q = torch.randn(b, lq, hq, d, dtype=dtype)
    k = torch.randn(b, lk, hk, d, dtype=dtype)
    v = torch.randn(b, lk, hk, d, dtype=dtype)
    out, lse = triton_cross_attention(q, k, v, **masks)
    leaves64, out64, lse64 = _ref((q, k, v), masks, torch.float64)
    leaves_t, out_t, _ = _ref((q, k, v), masks, dtype)
    floor = FLOOR[dtype] * (3 if dtype == torch.bfloat16 else 1)  # P is rounded to bf16 for P V
    assert_attention_close(out, out_t, out64, floor=floor, name=f"{name}: out")
    _check_lse(lse, lse64)
    grad = torch.randn_like(out64)
    g64 = torch.autograd.grad(out64, leaves64, grad)
    gt = torch.autograd.grad(out_t, leaves_t, grad.to(dtype))
    full = {"kv_lens": None, "q_media": None, "kv_media": None, "media_mode": "immediate", **masks}
    ours = triton_cross_attention_backward(grad.to(dtype), None, q, k, v, out, lse, full["kv_lens"],
                                           full["q_media"], full["kv_media"], full["media_mode"],
                                           d ** -0.5)
    for n, a, bt, c in zip("qkv", ours, gt, g64):
        assert_attention_close(a, bt, c, floor=floor, name=f"{name}: d{n}")
    mass = triton_key_attention_mass(q, k, **masks)
    ref = R.key_attention_mass(q.double(), k.double(), **masks)
    assert_close(mass, ref, atol=2e-3 * max(1.0, ref.abs().max().item()), rtol=0, name="mass")


def test_triton_chooser_reasons():
    from mmfast.ops.cross_attention import FORWARD_IMPLS
    q = torch.randn(1, 2, 1, 512)
    reasons = FORWARD_IMPLS[0].reasons(q, q)
    assert any("head dim 512" in r for r in reasons)


def test_cpu_xattn_bf16_path_follows_amx():
    """bfloat16 forward tiles through bfloat16 brgemm where the CPU has AMX (oneDNN's AMX
    kernels), else float32 GEMMs on widened tiles; MMFAST_CPU_XATTN_BF16=brgemm|widen
    overrides."""
    forced = os.environ.get("MMFAST_CPU_XATTN_BF16", "auto")
    if forced == "brgemm":
        expected = "bfloat16 brgemm (MMFAST_CPU_XATTN_BF16=brgemm)"
    elif forced == "widen":
        expected = "float32 GEMMs on widened tiles (MMFAST_CPU_XATTN_BF16=widen)"
    elif torch.cpu.get_capabilities().get("amx_bf16", False):
        expected = "bfloat16 brgemm (AMX)"
    else:
        expected = "float32 GEMMs on widened tiles (no AMX)"
    assert mmfast.cpu_xattn_bf16() == expected


def test_bfloat16_forward_on_the_other_path():
    """The bfloat16 forward path this CPU does not take by default (brgemm on VNNI-packed K
    and V without AMX, widened float32 tiles with it), forced by MMFAST_CPU_XATTN_BF16: the
    bfloat16 tests pass there too. Without AVX-512 ATen has no bfloat16 brgemm: nothing to
    force."""
    other = "widen" if mmfast.cpu_xattn_bf16().startswith("bfloat16 brgemm") else "brgemm"
    if other == "brgemm" and not cpu_has_avx512():
        pytest.skip("ATen's bfloat16 brgemm needs AVX-512")
    tests = ["tests/ops/test_cross_attention.py::test_cpu_xattn_bf16_path_follows_amx",
             "tests/ops/test_cross_attention.py::test_forward_and_gradients_match_reference"
             "[torch.bfloat16]",
             "tests/ops/test_cross_attention.py::test_no_allowed_key_gives_exact_zero_and_neg_inf"
             "[torch.bfloat16]",
             "tests/ops/test_cross_attention.py::test_extreme_magnitudes[torch.bfloat16]",
             "tests/ops/test_cross_attention.py::test_backward_is_deterministic[torch.bfloat16]"]
    assert_pytest_passes(tests, 5, MMFAST_CPU_XATTN_BF16=other)
