import torch

from tests.helpers import SampleInput, noncontiguous


def sample_inputs(device="cpu", dtype=torch.float32, requires_grad=False):
    out = []
    for b, n, c, keep, nc in [(2, 576, 16, 64, False), (3, 33, 7, 33, True), (1, 9, 5, 0, False),
                              (2, 50, 3, 17, True)]:
        x = torch.randn(b, n, c, device=device, dtype=dtype)
        x = (noncontiguous(x) if nc else x).requires_grad_(requires_grad)
        scores = torch.randn(b, n, device=device, dtype=dtype)
        out.append(SampleInput((x, scores, keep), name=f"N={n} keep={keep}{' nc' if nc else ''}"))
    return out
