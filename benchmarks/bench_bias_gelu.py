"""bias_gelu: gelu(x + b) over the hidden activations of real vision-language MLPs."""

import torch
import torch.nn.functional as F

import mmfast
from benchmarks.harness import Case, Provider, compiled, mmfast_implementation

OP = "bias_gelu"
MODES = ("forward", "forward+backward")


def _case(name, rows, cols, approximate="none"):
    def make_inputs(device, dtype, requires_grad):
        x = torch.randn(rows, cols, device=device, dtype=dtype, requires_grad=requires_grad)
        b = torch.randn(cols, device=device, dtype=dtype, requires_grad=requires_grad)
        return {"x": x, "bias": b, "approximate": approximate}

    # One read of x and one write of y is the least any implementation can move.
    return Case(name, {"rows": rows, "cols": cols, "approximate": approximate}, make_inputs,
                bytes=lambda dtype: 2 * rows * cols * dtype.itemsize)


def cases(quick):
    if quick:
        return [_case("LLaVA-1.5-7B projector hidden (1 image)", 576, 4096)]
    return [
        _case("LLaVA-1.5-7B projector hidden (8192 tok)", 8192, 4096),
        _case("SigLIP-so400m MLP hidden (729 tok, tanh)", 729, 4304, "tanh"),
        _case("CLIP ViT-L/14-336 MLP hidden (8 img)", 8 * 577, 4096),
    ]


def _reference(inp):
    return F.gelu(inp["x"] + inp["bias"], approximate=inp["approximate"])


def providers(device):
    return [
        Provider("eager F.gelu(x + b)", _reference, "eager"),
        Provider("torch.compile", compiled(_reference), "compile"),
        Provider("mmfast", lambda inp: mmfast.ops.bias_gelu(inp["x"], inp["bias"], inp["approximate"]),
                 "mmfast", implementation=mmfast_implementation(OP, device)),
    ]
