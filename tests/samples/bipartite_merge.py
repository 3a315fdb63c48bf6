import torch

from tests.helpers import SampleInput, noncontiguous


def sample_inputs(device="cpu", dtype=torch.float32, requires_grad=False):
    def make(*shape, nc=False):
        t = torch.randn(*shape, device=device, dtype=dtype)
        return noncontiguous(t) if nc else t

    out = []
    # (B, N, C, Cm, r, with size, protect_first, non-contiguous)
    for b, n, c, cm, r, sized, protect, nc in [
        (2, 577, 24, 16, 16, False, True, False),   # ViT-L/14-336 token count, CLS kept
        (1, 576, 8, 33, 288, True, False, False),   # N even, every A token merges
        (3, 31, 5, 7, 0, False, False, True),       # r = 0, odd sizes
        (2, 65, 17, 12, 32, True, True, True),      # largest r with a protected CLS
        (1, 2, 3, 4, 1, False, False, False),       # the smallest merge
    ]:
        x = make(b, n, c, nc=nc).requires_grad_(requires_grad)
        kwargs = {"protect_first": protect}
        if sized:
            kwargs["size"] = torch.randint(1, 5, (b, n), device=device).to(dtype)
        out.append(SampleInput((x, make(b, n, cm, nc=nc), r), kwargs,
                               name=f"N={n} r={r}{' size' if sized else ''}"
                                    f"{' cls' if protect else ''}{' nc' if nc else ''}"))
    return out
