import torch

from tests.helpers import SampleInput, noncontiguous


def sample_inputs(device="cpu", dtype=torch.float32, requires_grad=False):
    def make(*shape, nc=False):
        t = torch.randn(*shape, device=device, dtype=dtype) * 3
        t = noncontiguous(t) if nc else t
        return t.requires_grad_(requires_grad)

    out = []
    for shape, nc, approximate in [((97, 1025), False, "none"), ((3, 5, 72), False, "tanh"),
                                   ((1, 40), True, "none"), ((33, 7), True, "tanh"),
                                   ((256,), False, "none")]:
        out.append(SampleInput((make(*shape, nc=nc), make(shape[-1]), approximate),
                               name=f"{shape}{' nc' if nc else ''} {approximate}"))
    return out
