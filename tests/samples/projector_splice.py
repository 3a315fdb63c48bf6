import torch

from tests.helpers import SampleInput, noncontiguous
from tests.samples.projector import make_weights


def image_mask(batch, length, runs, device="cpu"):
    """Bool [batch, length] with True on the (b, start, stop) runs."""
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    for b, start, stop in runs:
        mask[b, start:stop] = True
    return mask


def sample_inputs(device="cpu", dtype=torch.float32, requires_grad=False):
    out = []
    cases = [  # (batch, length, placeholder runs, Cin, hidden, Hout, bias, approximate, nc embeds)
        (2, 50, [(0, 3, 40), (1, 10, 45)], 24, 65, 31, True, "none", False),  # long runs: direct GEMMs
        (2, 20, [(0, 1, 2), (0, 5, 8), (1, 0, 1), (1, 19, 20)], 17, 33, 16, True, "tanh", True),
        (3, 40, [(0, 0, 33), (1, 7, 9), (2, 4, 40)], 16, 40, 24, False, "none", True),  # mixed
        (1, 9, [], 8, 16, 8, True, "none", False),  # no image at all
        # float32 with several runs: panels of 512 output columns, the last one partial
        (2, 12, [(0, 2, 6), (1, 0, 5)], 8, 16, 1100, True, "none", False),
    ]
    for batch, length, runs, cin, hidden, hout, bias, approximate, nc in cases:
        mask = image_mask(batch, length, runs, device)
        n = int(mask.sum())
        x = torch.randn(n, cin, device=device, dtype=dtype).requires_grad_(requires_grad)
        w1, b1, w2, b2 = make_weights(cin, hidden, hout, device=device, dtype=dtype, bias=bias,
                                      requires_grad=requires_grad)
        embeds = torch.randn(batch, length, hout, device=device, dtype=dtype)
        embeds = (noncontiguous(embeds) if nc else embeds).requires_grad_(requires_grad)
        out.append(SampleInput((x, w1, b1, w2, b2, embeds, mask, approximate),
                               name=f"B{batch} L{length} N{n} h{hidden} o{hout} bias={bias} "
                                    f"{approximate}{' nc' if nc else ''}"))
    return out
