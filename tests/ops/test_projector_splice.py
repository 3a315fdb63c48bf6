import pytest
import torch

from mmfast import ops, reference
from tests.helpers import DTYPES, sample_inputs
from tests.ops._projector_common import check_like_torch, compare_fwd_bwd
from tests.samples.projector import make_weights
from tests.samples.projector_splice import image_mask


@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_masked_scatter_on_samples(dtype):
    for sample in sample_inputs("projector_splice", dtype=dtype, requires_grad=True):
        compare_fwd_bwd(ops.projector_splice, reference.projector_splice, sample.args, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_outside_the_mask_are_embeds_exactly(dtype):
    """Text rows are copied bit for bit; image rows equal projector(x) in order."""
    for sample in sample_inputs("projector_splice", dtype=dtype):
        x, w1, b1, w2, b2, embeds, mask, approximate = sample.args
        out = ops.projector_splice(*sample.args)
        assert torch.equal(out[~mask], embeds[~mask])
        # same kernels, only the rows of the second GEMM grouped differently
        torch.testing.assert_close(out[mask], ops.projector(x, w1, b1, w2, b2, approximate))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad, dtype):
    for sample in sample_inputs("projector_splice", dtype=dtype, requires_grad=requires_grad):
        torch.library.opcheck(torch.ops.mmfast.projector_splice.default, sample.args)
        if not requires_grad:
            torch.library.opcheck(torch.ops.mmfast.projector_splice.default, (*sample.args, False))


def test_inference_drops_the_pre_activation():
    sample = sample_inputs("projector_splice", dtype=torch.float32)[0]
    out_keep, h = torch.ops.mmfast.projector_splice(*sample.args, True)
    out_drop, empty = torch.ops.mmfast.projector_splice(*sample.args, False)
    assert h.shape == (sample.args[0].shape[0], sample.args[1].shape[0]) and empty.numel() == 0
    torch.testing.assert_close(out_drop, out_keep, atol=0, rtol=0)
    x = sample.args[0].detach().requires_grad_()
    with pytest.raises(RuntimeError, match="keep_h"):
        torch.ops.mmfast.projector_splice(x, *sample.args[1:], False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_backward(dtype):
    for sample in sample_inputs("projector_splice", dtype=dtype):
        x, w1, b1, w2, b2, embeds, mask, approximate = sample.args
        out, h = torch.ops.mmfast.projector_splice(*sample.args)
        for grads in ([True] * 6, [False, True, True, True, True, False], [True] + [False] * 5):
            torch.library.opcheck(torch.ops.mmfast.projector_splice_backward.default,
                                  (torch.randn_like(out), x, h, w1, w2, mask, approximate, grads))


def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: ops.projector_splice(*a).square().sum(), fullgraph=True)
    sample = sample_inputs("projector_splice", dtype=torch.float32, requires_grad=True)[0]
    compare_fwd_bwd(fn, lambda *a: reference.projector_splice(*a).square().sum(), sample.args,
                    torch.float32)


def _args(n_rows=None, **changes):
    mask = image_mask(2, 12, [(0, 2, 6), (1, 0, 3)])
    x = torch.randn(int(mask.sum()) if n_rows is None else n_rows, 8)
    w1, b1, w2, b2 = make_weights(8, 16, 10, device="cpu", dtype=torch.float32)
    args = dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2, embeds=torch.randn(2, 12, 10), image_mask=mask)
    args.update(changes)
    return args


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("name,changes", [
    ("image_mask", dict(image_mask=torch.ones(2, 11, dtype=torch.bool))),
    ("image_mask", dict(image_mask=torch.ones(2, 12, dtype=torch.int64))),
    ("embeds", dict(embeds=torch.randn(2, 12, 9))),
    ("embeds", dict(embeds=torch.randn(2, 12, 10, dtype=torch.float64))),
    ("x", dict(x=torch.randn(2, 3, 8))),
    ("w1", dict(w1=torch.randn(16, 7))),
    ("b2", dict(b2=torch.randn(9))),
])
def test_bad_input_names_the_argument(device, name, changes):
    args = {k: v.to(device) for k, v in _args(**changes).items()}
    with pytest.raises((ValueError, RuntimeError), match=rf"projector_splice: {name}\b"):
        ops.projector_splice(**args)


@pytest.mark.parametrize("n_rows", [6, 8])
def test_count_mismatch_is_a_clear_error(n_rows):
    with pytest.raises(ValueError, match=r"image_mask has 7 True positions but x has"):
        ops.projector_splice(**_args(n_rows=n_rows))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_splice_in_interpreter(dtype):
    """Triton: the second GEMM's rows written through the row-index map; the backward."""
    from mmfast.kernels import projector as kernels

    for sample in sample_inputs("projector_splice", dtype=dtype)[:3]:
        x, w1, b1, w2, b2, embeds, mask, approximate = sample.args
        tanh = approximate == "tanh"
        out, h = kernels.projector_splice_forward(x, w1, b1, w2, b2, embeds, mask, tanh)
        args64 = [t.double() if torch.is_tensor(t) and t.is_floating_point() else t
                  for t in sample.args]
        check_like_torch(out, reference.projector_splice(*sample.args),
                         reference.projector_splice(*args64), dtype, "triton splice")
        g = torch.randn_like(out)
        grads = kernels.projector_splice_backward(g, x, h, w1, w2, mask, tanh, [True] * 6)
        cpu = torch.ops.mmfast.projector_splice_backward(g, x, h, w1, w2, mask, approximate,
                                                         [True] * 6)
        for i, (a, b) in enumerate(zip(grads, cpu)):
            # the CPU kernel is checked against float64 above; same math, same stored h
            scale = 1 + b.abs().max().item() if b.numel() else 1
            tol = (3e-2 if dtype == torch.bfloat16 else 1e-5) * scale
            torch.testing.assert_close(a, b, atol=tol, rtol=0, msg=f"grad {i}")


def test_triton_count_mismatch_asserts():
    from mmfast.kernels import projector as kernels

    args = _args(n_rows=6)
    with pytest.raises(RuntimeError, match="image_mask"):
        kernels.projector_splice_forward(*args.values(), False)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda(dtype):
    for sample in sample_inputs("projector_splice", device="cuda", dtype=dtype, requires_grad=True):
        compare_fwd_bwd(ops.projector_splice, reference.projector_splice, sample.args, dtype)
