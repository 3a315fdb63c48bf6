import torch

from tests.helpers import SampleInput, noncontiguous


def make_weights(cin, hidden, hout, *, device, dtype, bias=True, requires_grad=False):
    """Weights at nn.Linear's scale (uniform, 1/sqrt(fan_in)) so activations stay O(1)."""
    def u(*shape, fan_in):
        t = (torch.rand(*shape, device=device, dtype=torch.float32) * 2 - 1) * fan_in ** -0.5
        return t.to(dtype).requires_grad_(requires_grad)
    w1, w2 = u(hidden, cin, fan_in=cin), u(hout, hidden, fan_in=hidden)
    b1 = u(hidden, fan_in=1) if bias else None
    b2 = u(hout, fan_in=1) if bias else None
    return w1, b1, w2, b2


def sample_inputs(device="cpu", dtype=torch.float32, requires_grad=False):
    out = []
    cases = [  # (leading dims of x, Cin, hidden, Hout, bias, approximate, non-contiguous x)
        ((37,), 40, 97, 33, True, "none", False),
        ((2, 5), 24, 65, 31, True, "tanh", False),
        ((1,), 17, 9, 8, False, "none", True),
        ((3, 1, 7), 33, 48, 40, False, "tanh", True),
        ((11,), 64, 130, 64, True, "none", True),
    ]
    for lead, cin, hidden, hout, bias, approximate, nc in cases:
        x = torch.randn(*lead, cin, device=device, dtype=dtype)
        x = (noncontiguous(x) if nc else x).requires_grad_(requires_grad)
        w1, b1, w2, b2 = make_weights(cin, hidden, hout, device=device, dtype=dtype, bias=bias,
                                      requires_grad=requires_grad)
        out.append(SampleInput((x, w1, b1, w2, b2, approximate),
                               name=f"x{lead + (cin,)} h{hidden} o{hout} bias={bias} "
                                    f"{approximate}{' nc' if nc else ''}"))
    return out
