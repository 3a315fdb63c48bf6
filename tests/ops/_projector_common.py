"""Shared checks of the projector tests: ours against float64 and against torch in the same
dtype (GEMM outputs: the attention rule, err(ours) <= 2 err(torch) + floor)."""

import torch

from tests.helpers import assert_attention_close

# Floor of the error rule relative to the size of the values, per dtype.
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def check_like_torch(ours, torch_same_dtype, ref64, dtype, name):
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    assert ours.dtype == dtype, f"{name}: dtype {ours.dtype} != {dtype}"
    if ref64.numel() == 0:
        return
    floor = FLOOR[dtype] * (1 + ref64.abs().max().item())
    assert_attention_close(ours, torch_same_dtype, ref64, floor=floor, name=name)


def _leaf(a, convert):
    if torch.is_tensor(a) and a.is_floating_point():
        return convert(a.detach()).requires_grad_(a.requires_grad)
    return a


def compare_fwd_bwd(op, ref_op, args, dtype, grad_seed=1):
    """Runs op (ours), ref_op in dtype and ref_op in float64 on the same values; compares the
    output and the gradient of every floating input that requires grad."""
    ours_in = [_leaf(a, lambda t: t) for a in args]  # same strides (non-contiguous stays so)
    same_in = [_leaf(a, lambda t: t.clone()) for a in args]
    ref_in = [_leaf(a, lambda t: t.double()) for a in args]
    out = op(*ours_in)
    same = ref_op(*same_in)
    ref = ref_op(*ref_in)
    check_like_torch(out, same, ref, dtype, "output")
    if not ref.requires_grad:
        return
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(g.to(out.device, dtype))
    same.backward(g.to(out.device, dtype))
    ref.backward(g.to(ref.device))
    for i, (a, b, c) in enumerate(zip(ours_in, same_in, ref_in)):
        if torch.is_tensor(a) and a.is_floating_point() and a.requires_grad:
            assert a.grad is not None, f"input {i}: no gradient"
            check_like_torch(a.grad, b.grad, c.grad, dtype, f"grad of input {i}")
