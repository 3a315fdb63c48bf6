"""Prints the tables of csrc/cpu/vec/gelu_table.h: Phi (the normal CDF) and phi (its density)
on [LO, 0] as INTERVALS cubics in t in [0, 1], each a least-squares fit in float64 at 200
Chebyshev nodes of its interval. `python tools/gelu_table.py` prints the C++ arrays;
tests/ops/test_projector.py checks that the header holds what this prints."""

import math

import torch

LO = -5.6
INTERVALS = 32
DEGREE = 3
NODES = 200


def _cdf(y):
    return torch.special.ndtr(y)


def _pdf(y):
    return torch.exp(-0.5 * y * y) / math.sqrt(2 * math.pi)


def coefficients(f) -> torch.Tensor:
    """[DEGREE + 1, INTERVALS] float32: f(LO + (i + t) w) ~ sum_d c[d, i] t^d, w = -LO / INTERVALS."""
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
    return {"kGeluCdfTable": coefficients(_cdf), "kGeluPdfTable": coefficients(_pdf)}


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
