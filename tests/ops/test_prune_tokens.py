import pytest
import torch

import mmfast
from mmfast import reference
from tests.helpers import DTYPES, noncontiguous, sample_inputs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype):
    for s in sample_inputs("prune_tokens", dtype=dtype, requires_grad=True):
        x, scores, keep = s.args
        kept, index = mmfast.ops.prune_tokens(x, scores, keep)
        ref_kept, ref_index = reference.prune_tokens(x.detach(), scores, keep)
        assert index.dtype == torch.int64 and torch.equal(index, ref_index), s
        assert torch.equal(kept.detach(), ref_kept), s
        grad = torch.randn_like(kept)
        kept.backward(grad)
        expected = torch.zeros(x.shape, dtype=dtype).scatter_(
            1, index[..., None].expand(-1, -1, x.shape[2]), grad)
        assert torch.equal(x.grad, expected), s


def test_ties_keep_lower_index_and_visionzip_budget():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]])
    x = torch.arange(6.0).reshape(1, 6, 1)
    kept, index = mmfast.ops.prune_tokens(x, scores, 2)
    assert index.tolist() == [[1, 2]]
    x = torch.randn(4, 576, 32)
    kept, index = mmfast.ops.prune_tokens(x, torch.randn(4, 576), 64)
    assert kept.shape == (4, 64, 32) and (index.diff(dim=1) > 0).all()


def test_any_dtype_of_x_and_noncontiguous():
    x = torch.randint(0, 100, (2, 30, 5))
    scores = torch.randn(2, 30)
    kept, index = mmfast.ops.prune_tokens(x, scores, 7)
    assert torch.equal(kept, x.gather(1, index[..., None].expand(-1, -1, 5)))
    xf = torch.randn(2, 30, 5)
    a = mmfast.ops.prune_tokens(noncontiguous(xf), noncontiguous(scores), 9)
    b = mmfast.ops.prune_tokens(xf, scores, 9)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_opcheck_and_compile():
    for s in sample_inputs("prune_tokens", dtype=torch.float32, requires_grad=True):
        torch.library.opcheck(torch.ops.mmfast.prune_tokens.default, s.args, s.kwargs)

    def f(x, scores):
        kept, _ = mmfast.ops.prune_tokens(x, scores, 10)
        return (kept * kept).sum()

    x = torch.randn(2, 40, 6, requires_grad=True)
    scores = torch.randn(2, 40)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, scores)
    (g,) = torch.autograd.grad(out, x)
    x2 = x.detach().requires_grad_()
    (g2,) = torch.autograd.grad(f(x2, scores), x2)
    assert torch.equal(g, g2)


@pytest.mark.parametrize("args, match", [
    ((torch.randn(2, 10, 3), torch.randn(2, 10), 11), "keep must be in"),
    ((torch.randn(2, 10, 3), torch.randn(2, 10), -1), "keep must be in"),
    ((torch.randn(2, 10, 3), torch.randn(2, 9), 3), "scores must have shape"),
    ((torch.randn(2, 10), torch.randn(2, 10), 3), "x must have shape"),
    ((torch.randn(2, 10, 3), torch.randint(0, 3, (2, 10)), 3), "scores must be float32"),
    ((torch.randn(2, 10, 3), torch.tensor([[0.0] * 9 + [float("nan")]] * 2), 3), "NaN"),
])
def test_bad_input_names_the_argument(args, match):
    with pytest.raises((ValueError, RuntimeError), match=match):
        mmfast.ops.prune_tokens(*args)


def test_triton_path_in_interpreter():
    import importlib

    op = importlib.import_module("mmfast.ops.prune_tokens")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 37, 5, dtype=dtype)
        scores = torch.randn(2, 37, dtype=dtype)
        kept, index = op._run_triton(x, scores, 11)
        ref_kept, ref_index = reference.prune_tokens(x, scores, 11)
        assert torch.equal(index, ref_index) and torch.equal(kept, ref_kept)
        grad = torch.randn_like(kept)
        assert torch.equal(op._run_triton_backward(grad, index, 37),
                           torch.ops.mmfast.prune_tokens_backward(grad, index, 37))


@pytest.mark.cuda
def test_cuda_matches_reference():
    for dtype in DTYPES:
        for s in sample_inputs("prune_tokens", device="cuda", dtype=dtype, requires_grad=True):
            x, scores, keep = s.args
            kept, index = mmfast.ops.prune_tokens(x, scores, keep)
            ref_kept, ref_index = reference.prune_tokens(x.detach().cpu(), scores.cpu(), keep)
            assert torch.equal(index.cpu(), ref_index) and torch.equal(kept.detach().cpu(), ref_kept)
            kept.sum().backward()
            assert torch.equal(x.grad.cpu().sum(-1) != 0, torch.zeros(x.shape[:2], dtype=torch.bool)
                               .scatter_(1, ref_index, True)) or x.shape[2] == 0
