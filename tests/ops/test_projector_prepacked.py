"""Weights packed once for inference (mmfast::_projector_pack_weight, _projector_prepacked):
the packed layout, the forward from packed copies against the projector op, errors, opcheck.
These run only where the bfloat16 GEMMs run on mmfast's tiles (mmfast.cpu_bf16_gemm())."""

import pytest
import torch
import torch.nn.functional as F

import mmfast
from mmfast import ops
from tests.helpers import noncontiguous
from tests.samples.projector import make_weights

TILES = torch.ops.mmfast._cpu_bf16_tile_gemm()
pytestmark = pytest.mark.skipif(not TILES, reason=f"bfloat16 GEMMs here: {mmfast.cpu_bf16_gemm()}")

pack = torch.ops.mmfast._projector_pack_weight
prepacked = torch.ops.mmfast._projector_prepacked


def _layout(w):
    """The packed copy's values as [ceil(N/64), ceil(K/2), 64, 2], built with torch; zeros past N
    and K. For the vdpbf16ps tiles packed[b, p, j, e] = w[64 b + j, 2 p + e]; for the AMX tiles
    each block is four groups of 16 columns, each in one piece: the values of block b in the
    order [j // 16, p, j % 16, e]."""
    n, k = w.shape
    nb, k2 = -(-n // 64), -(-k // 2)
    padded = F.pad(w, (0, 2 * k2 - k, 0, 64 * nb - n))
    if mmfast.cpu_bf16_gemm().startswith("AMX"):
        grouped = padded.view(nb, 4, 16, k2, 2).permute(0, 1, 3, 2, 4).contiguous()
        return grouped.view(nb, k2, 64, 2)
    return padded.view(nb, 64, k2, 2).permute(0, 2, 1, 3).contiguous()


@pytest.mark.parametrize("n,k,sliced", [(130, 1025, False), (64, 40, True), (1, 1, False),
                                        (4097, 72, True), (2048, 2049, False)])
def test_pack_weight_layout(n, k, sliced):
    """Odd K (a zero pair member), N past a 64-column block, and weights read with a row stride
    (slices of a wider tensor) or an unaligned start. The packed copy of 2048 x 2049 is over 8
    MiB: it is allocated on huge pages (cpu/huge_pages.h)."""
    w = torch.randn(n, k + 3, dtype=torch.bfloat16)[:, 3:] if sliced else \
        torch.randn(n, k, dtype=torch.bfloat16)
    assert torch.equal(pack(w), _layout(w))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("lead,cin,hidden,hout,bias", [((97,), 1025, 130, 4097, True),
                                                       ((3, 7), 40, 72, 64, False),
                                                       ((1,), 1000, 4097, 72, True)])
def test_prepacked_equals_projector(approximate, lead, cin, hidden, hout, bias):
    """The same tile kernels on the same packed data: bit for bit the op's inference output,
    non-contiguous x included."""
    x = noncontiguous(torch.randn(*lead, cin, dtype=torch.bfloat16))
    w1, b1, w2, b2 = make_weights(cin, hidden, hout, device="cpu", dtype=torch.bfloat16,
                                  bias=bias)
    with torch.no_grad():
        expected = ops.projector(x, w1, b1, w2, b2, approximate)
    out = prepacked(x, w1, pack(w1), b1, w2, pack(w2), b2, approximate)
    assert out.shape == (*lead, hout)
    assert torch.equal(out, expected)


def test_prepacked_reads_the_packed_copies():
    """The forward computes with the packed copies, not with the weights passed for checks:
    packed from other weights of the same shapes, it gives those weights' output."""
    x = torch.randn(300, 40, dtype=torch.bfloat16)
    w1, b1, w2, b2 = make_weights(40, 72, 130, device="cpu", dtype=torch.bfloat16)
    v1, _, v2, _ = make_weights(40, 72, 130, device="cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = ops.projector(x, v1, b1, v2, b2, "none")
    assert torch.equal(prepacked(x, w1, pack(v1), b1, w2, pack(v2), b2, "none"), expected)


def test_prepacked_over_panels():
    """4184 tokens at hidden 2050: three panels of rows, the next panel's first GEMM alongside
    the second GEMM of the one before; equal to the op and independent of the thread count."""
    x = torch.randn(4184, 40, dtype=torch.bfloat16)
    w1, b1, w2, b2 = make_weights(40, 2050, 130, device="cpu", dtype=torch.bfloat16)
    p1, p2 = pack(w1), pack(w2)
    with torch.no_grad():
        expected = ops.projector(x, w1, b1, w2, b2, "none")
    out = prepacked(x, w1, p1, b1, w2, p2, b2, "none")
    assert torch.equal(out, expected)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(prepacked(x, w1, p1, b1, w2, p2, b2, "none"), out)
    finally:
        torch.set_num_threads(threads)


def test_prepacked_empty_rows():
    x = torch.randn(0, 40, dtype=torch.bfloat16)
    w1, b1, w2, b2 = make_weights(40, 72, 64, device="cpu", dtype=torch.bfloat16)
    assert prepacked(x, w1, pack(w1), b1, w2, pack(w2), b2, "none").shape == (0, 64)


def test_bad_input_names_the_argument():
    x = torch.randn(5, 40, dtype=torch.bfloat16)
    w1, b1, w2, b2 = make_weights(40, 72, 64, device="cpu", dtype=torch.bfloat16)
    p1, p2 = pack(w1), pack(w2)
    with pytest.raises(ValueError, match="w1_packed"):
        prepacked(x, w1, p2, b1, w2, p2, b2, "none")
    with pytest.raises(ValueError, match="w2_packed"):
        prepacked(x, w1, p1, b1, w2, p2.float(), b2, "none")
    wide = torch.zeros(*p2.shape[:-1], 4, dtype=p2.dtype)
    wide[..., :2] = p2
    with pytest.raises(ValueError, match="not contiguous"):
        prepacked(x, w1, p1, b1, w2, wide[..., :2], b2, "none")
    with pytest.raises(ValueError, match="x must be bfloat16"):
        prepacked(x.float(), w1.float(), p1, b1.float(), w2.float(), p2, b2.float(), "none")
    with pytest.raises(ValueError, match="w2 must have shape"):
        prepacked(x, w1, p1, b1, w1, p1, b2, "none")
    with pytest.raises(ValueError, match="w must be bfloat16"):
        pack(w1.float())
    with pytest.raises(ValueError, match="w must be 2-D"):
        pack(b1)


def test_opcheck():
    x = torch.randn(2, 9, 40, dtype=torch.bfloat16)
    w1, b1, w2, b2 = make_weights(40, 72, 64, device="cpu", dtype=torch.bfloat16)
    torch.library.opcheck(pack.default, (w1,))
    torch.library.opcheck(prepacked.default, (x, w1, pack(w1), b1, w2, pack(w2), None, "tanh"))
