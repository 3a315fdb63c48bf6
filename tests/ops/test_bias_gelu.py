import os
import subprocess
import sys

import pytest
import torch

import mmfast
from mmfast import reference
from tests.helpers import DTYPES, assert_close, noncontiguous, sample_inputs, tol

APPROX = ("none", "tanh")


def _ref_fwd_bwd(x, bias, approximate, grad):
    """float64 reference output and gradients."""
    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    y = reference.bias_gelu(x64, b64, approximate)
    y.backward(grad.double())
    return y.detach(), x64.grad, b64.grad


def _bias_tol(dtype, rows):
    # The bias gradient sums `rows` rounded products: its error grows with the row count.
    atol, rtol = tol(dtype)
    return atol * max(1.0, rows ** 0.5) * 4, rtol * 4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_matches_reference(dtype):
    for s in sample_inputs("bias_gelu", dtype=dtype, requires_grad=True):
        x, bias, approximate = s.args
        y = mmfast.ops.bias_gelu(x, bias, approximate)
        grad = torch.randn_like(y)
        y.backward(grad)
        ref_y, ref_dx, ref_db = _ref_fwd_bwd(x, bias, approximate, grad)
        assert y.dtype == dtype and y.shape == x.shape
        atol, rtol = tol(dtype)
        assert_close(y, ref_y, atol=atol, rtol=rtol, name=f"y {s}")
        assert_close(x.grad, ref_dx, atol=atol, rtol=rtol, name=f"dx {s}")
        rows = x.numel() // x.shape[-1]
        assert_close(bias.grad, ref_db, **dict(zip(("atol", "rtol"), _bias_tol(dtype, rows))),
                     name=f"dbias {s}")


@pytest.mark.parametrize("approximate", APPROX)
def test_extreme_values(approximate):
    x = torch.tensor([[0.0, -1e4, 1e4, 30.0, -30.0, 1e-30, float("inf"), float("-inf")]])
    bias = torch.zeros(x.shape[-1])
    y = mmfast.ops.bias_gelu(x, bias, approximate)
    assert_close(y, reference.bias_gelu(x.double(), bias.double(), approximate),
                 atol=1e-6, rtol=1e-6)


def test_backward_deterministic():
    x = torch.randn(1031, 257, requires_grad=True)
    bias = torch.randn(257, requires_grad=True)
    grad = torch.randn(1031, 257)
    results = []
    for _ in range(3):
        dx, db = torch.ops.mmfast.bias_gelu_backward(grad, x, bias, "none")
        results.append((dx, db))
    for dx, db in results[1:]:
        assert torch.equal(dx, results[0][0]) and torch.equal(db, results[0][1])


@pytest.mark.parametrize("isa", ["default", "avx2"])
def test_each_isa_build(isa):
    """The generic and AVX2 builds (forced by MMFAST_CPU_ISA) agree with the reference too;
    the test run itself uses the best one this CPU has."""
    code = (
        "import torch, mmfast\n"
        f"assert mmfast.cpu_isa() in ('{isa}',), mmfast.cpu_isa()\n"
        "torch.manual_seed(0)\n"
        "for dt in (torch.float32, torch.bfloat16, torch.float16):\n"
        "  for a in ('none', 'tanh'):\n"
        "    x = torch.randn(37, 133, dtype=dt) * 3; b = torch.randn(133, dtype=dt)\n"
        "    g = torch.randn_like(x)\n"
        "    y = mmfast.ops.bias_gelu(x, b, a)\n"
        "    dx, db = torch.ops.mmfast.bias_gelu_backward(g, x, b, a)\n"
        "    r = mmfast.reference.bias_gelu(x.double(), b.double(), a)\n"
        "    tol = 1e-5 if dt == torch.float32 else 2e-2\n"
        "    assert torch.allclose(y.double(), r, atol=tol, rtol=tol), (dt, a)\n"
        "    xd = x.double().requires_grad_(); mmfast.reference.bias_gelu(xd, b.double(), a).backward(g.double())\n"
        "    assert torch.allclose(dx.double(), xd.grad, atol=tol, rtol=tol), (dt, a)\n"
    )
    env = dict(os.environ, MMFAST_CPU_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_bad_isa_name_is_an_error():
    env = dict(os.environ, MMFAST_CPU_ISA="sse9")
    code = "import torch, mmfast; mmfast.ops.bias_gelu(torch.randn(2, 3), torch.randn(3))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "MMFAST_CPU_ISA" in out.stderr


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # tanh via exp saturates
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROX)
def test_triton_interpreter(dtype, approximate):
    from mmfast.kernels.bias_gelu import bias_gelu_backward, bias_gelu_forward

    x = noncontiguous(torch.randn(19, 300, dtype=dtype) * 3)
    bias = torch.randn(300, dtype=dtype)
    grad = torch.randn(19, 300, dtype=dtype)
    ref_y, ref_dx, ref_db = _ref_fwd_bwd(x, bias, approximate, grad)
    atol, rtol = tol(dtype)
    assert_close(bias_gelu_forward(x, bias, approximate == "tanh"), ref_y, atol=atol, rtol=rtol)
    dx, db = bias_gelu_backward(grad, x, bias, approximate == "tanh")
    assert_close(dx, ref_dx, atol=atol, rtol=rtol, name="dx")
    assert_close(db, ref_db, **dict(zip(("atol", "rtol"), _bias_tol(dtype, 19))), name="dbias")


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.randn(4, 8), torch.randn(7), "none"), "bias must have shape \\[8\\]"),
        ((torch.randn(4, 8), torch.randn(2, 8), "none"), "bias must have shape"),
        ((torch.randn(4, 8), torch.randn(8, dtype=torch.float64), "none"), "bias dtype"),
        ((torch.randn(4, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64), "none"),
         "x must be float32, float16 or bfloat16"),
        ((torch.randn(4, 8), torch.randn(8), "erf"), "approximate must be 'none' or 'tanh'"),
        ((torch.tensor(1.0), torch.randn(1), "none"), "at least one dimension"),
    ],
)
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        mmfast.ops.bias_gelu(*args)
    with pytest.raises(ValueError, match=match):  # the fake kernel says the same
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            mmfast.ops.bias_gelu(*(mode.from_tensor(a) if torch.is_tensor(a) else a for a in args))


def test_empty_input():
    x = torch.randn(0, 16, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    y = mmfast.ops.bias_gelu(x, bias)
    y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(bias.grad, torch.zeros(16))


def test_torch_compile_fullgraph():
    fn = torch.compile(lambda x, b: mmfast.ops.bias_gelu(x, b, "tanh") * 2, fullgraph=True)
    x = torch.randn(9, 40, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    y = fn(x, b)
    y.sum().backward()
    x2, b2 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    (reference.bias_gelu(x2, b2, "tanh") * 2).sum().backward()
    assert_close(y, (reference.bias_gelu(x2, b2, "tanh") * 2), atol=1e-5, rtol=1e-5)
    assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    assert_close(b.grad, b2.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_backends_match_reference(backend, dtype):
    for s in sample_inputs("bias_gelu", device="cuda", dtype=dtype, requires_grad=True):
        x, bias, approximate = s.args
        if backend == "cuda" and x.shape[-1] % (16 // x.element_size()):
            with mmfast.backend(backend), pytest.raises(NotImplementedError, match="16-byte"):
                mmfast.ops.bias_gelu(x, bias, approximate)
            continue
        with mmfast.backend(backend):
            y = mmfast.ops.bias_gelu(x, bias, approximate)
            grad = torch.randn_like(y)
            y.backward(grad)
        assert mmfast.last_choice("bias_gelu").startswith(backend)
        ref_y, ref_dx, ref_db = _ref_fwd_bwd(x.cpu(), bias.cpu(), approximate, grad.cpu())
        atol, rtol = tol(dtype)
        assert_close(y, ref_y, atol=atol, rtol=rtol, name=f"y {s}")
        assert_close(x.grad, ref_dx, atol=atol, rtol=rtol, name=f"dx {s}")
        rows = x.numel() // x.shape[-1]
        assert_close(bias.grad, ref_db, **dict(zip(("atol", "rtol"), _bias_tol(dtype, rows))))
