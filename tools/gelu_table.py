"""Prints the tables of csrc/cpu/vec/gelu_table.h: for each GELU form its gate S (exact: Phi,
the normal CDF; tanh: 0.5 (1 + tanh(k (y + c y^3)))) and the gate's derivative S', on [LO, 0],
as INTERVALS cubics in t in [0, 1], each a least-squares fit in float64 at 200 Chebyshev nodes
of its interval. `python tools/gelu_table.py` prints the C++ arrays;
tests/ops/test_projector.py checks that the header holds what this prints."""

import math

import torch

LO = -5.6
INTERVALS = 32
DEGREE = 3
NODES = 200
TANH_K = math.sqrt(2 / math.pi)
TANH_C = 0.044715


def _cdf(y):
    return torch.special.ndtr(y)


def _pdf(y):
    return torch.exp(-0.5 * y * y) / math.sqrt(2 * math.pi)


def _tanh_gate(y):
    return 0.5 * (1 + torch.tanh(TANH_K * (y + TANH_C * y**3)))


def _tanh_gate_grad(y):
    t = torch.tanh(TANH_K * (y + TANH_C * y**3))
    return 0.5 * (1 - t * t) * TANH_K * (1 + 3 * TANH_C * y * y)


def coefficients(f) -> torch.Tensor:
    """[DEGREE + 1, INTERVALS] float32: f(LO + (i + t) w) ~ sum_d c[d, i] t^d,
    w = -LO / INTERVALS."""
    width = -LO / INTERVALS
    k = torch.arange(NODES, dtype=torch.float64)
    t = (torch.cos(math.pi * (k + 0.5) / NODES) + 1) / 2
    powers = torch.stack([t**d for d in range(DEGREE + 1)], dim=1)
    out = torch.empty(DEGREE + 1, INTERVALS, dtype=torch.float64)
    for i in range(INTERVALS):
        values = f(LO + (i + t) * width)
        out[:, i] = torch.linalg.lstsq(powers, values[:, None]).solution[:, 0]
    return out.float()


def tables() -> dict:
    return {"kGeluCdfTable": coefficients(_cdf), "kGeluPdfTable": coefficients(_pdf),
            "kGeluTanhGateTable": coefficients(_tanh_gate),
            "kGeluTanhGateGradTable": coefficients(_tanh_gate_grad)}


def cpp() -> str:
    lines = []
    for name, table in tables().items():
        lines.append(f"inline constexpr float {name}[{DEGREE + 1}][{INTERVALS}] = {{")
        for row in table.tolist():
            vals = [f"{v:.9e}f" for v in row]
            chunks = [", ".join(vals[j:j + 4]) for j in range(0, len(vals), 4)]
            lines.append("    {" + ",\n     ".join(chunks) + "},")
        lines.append("};")
    return "\n".join(lines)


if __name__ == "__main__":
    print(cpp())
