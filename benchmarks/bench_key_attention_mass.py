"""key_attention_mass: attention each image token receives (FastV / VisionZip-style pruning
scores), against the eager reference that materializes the probabilities.

GFLOP/s count the attended (query, key) pairs: 2·D flops per pair and query head for Q Kᵀ,
done twice (the row statistics, then the column sums)."""

import mmfast
from benchmarks.bench_cross_attention import _case
from benchmarks.harness import Case, Provider, mmfast_implementation

OP = "key_attention_mass"
MODES = ("forward",)


def _mass_case(name, *args, **kwargs):
    c = _case(name, *args, **kwargs)
    return Case(c.name, c.params, c.make_inputs, flops=c.flops)  # 4·D per pair: 2 passes x 2·D


def cases(quick):
    if quick:
        return [_mass_case("LLaVA-1.5 FastV layer-2 scores (short prompt)", 1, 64, 576, 8, 8, 128)]
    return [
        _mass_case("LLaVA-1.5-7B FastV layer-2 scores (576 image tok)", 1, 640, 576, 32, 32, 128),
        _mass_case("OpenFlamingo-9B x-attn mass, immediate", 4, 1024, 320, 8, 8, 64,
                   counts=[64] * 5, mode="immediate"),
    ]


def _reference(inp):
    return mmfast.reference.key_attention_mass(inp["q"], inp["k"], **inp["masks"])


def providers(device):
    return [
        Provider("eager reference", _reference, "eager"),
        Provider("mmfast", lambda inp: mmfast.ops.key_attention_mass(inp["q"], inp["k"],
                                                                     **inp["masks"]),
                 "mmfast", implementation=mmfast_implementation(OP, device)),
    ]
