"""Image-token compression: ToMe bipartite merging and score-based pruning at the token counts
of real vision-language models, and what the compression buys the projector that follows.

Providers: ToMe's own algorithm in eager PyTorch (mmfast.reference.tome_bipartite_merge, which
holds the full A x B similarity matrix), the same under torch.compile, and mmfast. The
"+ projector" cases time compression followed by a LLaVA-1.5 projector (Linear-GELU-Linear,
1024 -> 4096 -> 4096, the same eager torch code for every provider), beside the projector on
the uncompressed tokens: the end-to-end effect. The PerceiverResampler row times the whole
mmfast.nn module twice: as shipped (mmfast.ops.cross_attention) and with its attention calls
replaced by the plain-PyTorch reference (eager provider); torch.compile does not take it.
"""

import contextlib

import torch
import torch.nn.functional as F

import mmfast
import mmfast.nn.resampler
from mmfast import reference
from benchmarks.harness import Case, Provider, compiled
from mmfast.reference.bipartite_merge import tome_bipartite_merge

OP = "bipartite_merge"
COVERS = ("bipartite_merge", "prune_tokens")
MODES = ("forward",)


def _merge_case(name, b, n, c, rounds, with_projector=False):
    """rounds: r of each successive merge (sizes carried from one to the next)."""
    def make_inputs(device, dtype, requires_grad):
        inp = {"kind": "merge", "rounds": rounds,
               "x": torch.randn(b, n, c, device=device, dtype=dtype),
               "metric": torch.randn(b, n, c, device=device, dtype=dtype)}
        if with_projector:
            inp.update(_projector_weights(device, dtype, c))
        return inp

    flops = sum(2 * b * ((m + 1) // 2) * (m // 2) * c for m in _token_counts(n, rounds))
    return Case(name, {"B": b, "N": n, "C": c, "r": "+".join(map(str, rounds))}, make_inputs,
                flops=flops)


def _token_counts(n, rounds):
    for r in rounds:
        yield n
        n -= r


def _prune_case(name, b, n, c, keep):
    def make_inputs(device, dtype, requires_grad):
        return {"kind": "prune", "keep": keep,
                "x": torch.randn(b, n, c, device=device, dtype=dtype),
                "scores": torch.rand(b, n, device=device, dtype=torch.float32)}

    return Case(name, {"B": b, "N": n, "C": c, "keep": keep}, make_inputs,
                bytes=lambda dtype: 2 * b * keep * c * dtype.itemsize)


def _projector_weights(device, dtype, c, hidden=4096):
    def w(*shape):
        return torch.randn(*shape, device=device, dtype=dtype) * shape[-1] ** -0.5
    return {"w1": w(hidden, c), "b1": w(hidden), "w2": w(hidden, hidden), "b2": w(hidden)}


def _projector_case(name, b, n, c):
    def make_inputs(device, dtype, requires_grad):
        return {"kind": "project", "x": torch.randn(b, n, c, device=device, dtype=dtype),
                **_projector_weights(device, dtype, c)}

    return Case(name, {"B": b, "N": n, "C": c}, make_inputs)


def _perceiver_case(name, b, n, dim, depth, heads, dim_head, num_latents):
    """open_flamingo's resampler (its ViT-L/14 config) on one image of n tokens per sample."""
    def make_inputs(device, dtype, requires_grad):
        torch.manual_seed(0)
        module = mmfast.nn.PerceiverResampler(dim=dim, depth=depth, heads=heads,
                                              dim_head=dim_head, num_latents=num_latents)
        return {"kind": "perceiver", "module": module.to(device, dtype).eval(),
                "x": torch.randn(b, n, dim, device=device, dtype=dtype)}

    inner, lk = heads * dim_head, n + num_latents
    # q, kv and out projections, q kᵀ and p v, then the 4x feed-forward.
    per_layer = 2 * b * (2 * num_latents * dim * inner + 2 * lk * dim * inner
                         + 2 * num_latents * lk * inner + 8 * num_latents * dim * dim)
    return Case(name, {"B": b, "N": n, "C": dim, "depth": depth, "latents": num_latents},
                make_inputs, flops=depth * per_layer)


def cases(quick):
    if quick:
        return [_merge_case("ViT-B/16-224 ToMe layer (r=8)", 2, 197, 768, (8,)),
                _prune_case("VisionZip 576 -> 64", 2, 576, 1024, 64)]
    return [
        _merge_case("ViT-L/14-336 ToMe layer (B=8, r=16)", 8, 577, 1024, (16,)),
        _merge_case("LLaVA-NeXT image 2880 -> 1440", 1, 2880, 1024, (1440,)),
        _merge_case("video 16 x 576 -> 1/4 (2 rounds)", 16, 576, 1024, (288, 144)),
        _prune_case("VisionZip 576 -> 64 (B=8)", 8, 576, 1024, 64),
        _projector_case("LLaVA-NeXT projector, 2880 tokens (uncompressed)", 1, 2880, 1024),
        _merge_case("LLaVA-NeXT 2880 -> 1440 + projector", 1, 2880, 1024, (1440,),
                    with_projector=True),
        _perceiver_case("open_flamingo PerceiverResampler, 577 tokens -> 64 (B=4)", 4, 577,
                        1024, 6, 8, 64, 64),
    ]


def _project(inp, x):
    h = F.gelu(F.linear(x, inp["w1"], inp["b1"]))
    return F.linear(h, inp["w2"], inp["b2"])


@contextlib.contextmanager
def _reference_attention():
    """The resampler module with its attention computed by mmfast.reference.cross_attention."""
    shipped = mmfast.nn.resampler.cross_attention
    mmfast.nn.resampler.cross_attention = reference.cross_attention
    try:
        yield
    finally:
        mmfast.nn.resampler.cross_attention = shipped


def _run(merge, prune, attention=contextlib.nullcontext):
    def fn(inp):
        if inp["kind"] == "perceiver":
            _last["op"] = "cross_attention"
            with attention(), torch.no_grad():
                return inp["module"](inp["x"])
        if inp["kind"] == "prune":
            return prune(inp["x"], inp["scores"], inp["keep"])
        x = inp["x"]
        if inp["kind"] == "merge":
            metric, size = inp["metric"], None
            for r in inp["rounds"]:
                x, size = merge(x, metric, r, size)
                metric = x  # a later round measures similarity on the merged tokens
        if "w1" in inp:
            return _project(inp, x)
        return x
    return fn


def _tome(x, metric, r, size):
    return tome_bipartite_merge(x, metric, r, size=size)


def _mmfast(x, metric, r, size):
    merged, merged_size, _ = mmfast.ops.bipartite_merge(x, metric, r, size=size)
    return merged, merged_size


def _reference_prune(x, scores, keep):
    # VisionZip's selection: top-k indices, put back in token order, then a gather.
    index = scores.topk(keep, dim=1).indices.sort(dim=1).values
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[2]))


_last = {"op": OP}


def _mmfast_prune(x, scores, keep):
    _last["op"] = "prune_tokens"
    return mmfast.ops.prune_tokens(x, scores, keep)[0]


def _not_compiled(case, dtype, mode):
    if "PerceiverResampler" in case.name:
        return "the module-level comparison swaps attention functions; not traced"
    return None


def _mmfast_merge(x, metric, r, size):
    _last["op"] = "bipartite_merge"
    return _mmfast(x, metric, r, size)


def providers(device):
    eager = _run(_tome, _reference_prune, _reference_attention)

    def implementation():
        if device.type == "cuda":
            return f"mmfast[{mmfast.last_choice(_last['op']) or '?'}]"
        return f"mmfast[cpu-{mmfast.cpu_isa()}]"

    return [
        Provider("eager ToMe / topk reference", eager, "eager"),
        Provider("torch.compile", compiled(eager), "compile", supports=_not_compiled),
        Provider("mmfast", _run(_mmfast_merge, _mmfast_prune), "mmfast",
                 implementation=implementation),
    ]
