"""projector and projector_splice: the VLM adapter MLP (Linear -> GELU -> Linear) at the shapes of
real models, for inference (forward) and for the alignment stage's training step (x frozen,
projector weights trained: forward+backward), and its fused splice into the LLM's input
embeddings (LLaVA's masked_scatter)."""

import torch
import torch.nn.functional as F

import mmfast
import mmfast.nn
from benchmarks.harness import Case, Provider, compiled, mmfast_implementation

OP = "projector"
COVERS = ("projector", "projector_splice")
MODES = ("forward", "forward+backward")


def _weights(cin, hidden, hout, device, dtype, requires_grad):
    def u(*shape, fan_in):
        t = (torch.rand(*shape, device=device) * 2 - 1) * fan_in ** -0.5
        return t.to(dtype).requires_grad_(requires_grad)
    return {"w1": u(hidden, cin, fan_in=cin), "b1": u(hidden, fan_in=cin),
            "w2": u(hout, hidden, fan_in=hidden), "b2": u(hout, fan_in=hidden)}


def _case(name, tokens, cin, hidden, hout, *, approximate="none", splice=None, training=True):
    """tokens image tokens in all; splice = (batch, text tokens per sequence) puts each
    sequence's tokens // batch image tokens after a short prompt prefix."""

    def make_inputs(device, dtype, requires_grad):
        # the alignment stage: the vision features come from a frozen encoder
        inputs = {"x": torch.randn(tokens, cin, device=device, dtype=dtype),
                  **_weights(cin, hidden, hout, device, dtype, requires_grad),
                  "approximate": approximate}
        if splice is not None:
            batch, text = splice
            per_image = tokens // batch
            length = per_image + text
            mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
            mask[:, 5:5 + per_image] = True  # "USER: <image>" prefix, then the image tokens
            inputs["embeds"] = torch.randn(batch, length, hout, device=device, dtype=dtype)
            inputs["image_mask"] = mask
        return inputs

    params = {"tokens": tokens, "dims": f"{cin}->{hidden}->{hout}", "gelu": approximate}
    if splice is not None:
        params["splice"] = f"B={splice[0]} L={tokens // splice[0] + splice[1]}"
    flops = 2 * tokens * (cin * hidden + hidden * hout)
    # x frozen: grad_w2, grad_h (through w2) and grad_w1; no grad_x
    backward_flops = 2 * tokens * (2 * hidden * hout + cin * hidden)
    case = Case(name, params, make_inputs, flops=flops, backward_flops=backward_flops)
    case.training = training
    return case


def cases(quick):
    if quick:
        return [_case("LLaVA-1.5-7B projector (64 tok, quick)", 64, 256, 1024, 1024),
                _case("LLaVA-1.5-7B splice (quick)", 128, 256, 1024, 1024, splice=(2, 16))]
    return [
        _case("LLaVA-1.5-7B (8 img x 576)", 8 * 576, 1024, 4096, 4096),
        _case("LLaVA-1.5-13B (8 img x 576)", 8 * 576, 1024, 5120, 5120),
        _case("SigLIP-so400m -> 7B LLM (729 tok)", 729, 1152, 4096, 4096),
        _case("InternVL-style pixel-shuffled (7 tiles x 256)", 7 * 256, 4096, 4096, 4096),
        _case("LLaVA-1.5-7B inference (1 img x 576)", 576, 1024, 4096, 4096, training=False),
        _case("LLaVA-1.5-7B splice (8 img x 576)", 8 * 576, 1024, 4096, 4096, splice=(8, 64)),
    ]


def _eager(inp):
    """nn.Sequential(Linear, GELU, Linear), then LLaVA's masked_scatter for the splice."""
    y = F.linear(F.gelu(F.linear(inp["x"], inp["w1"], inp["b1"]), approximate=inp["approximate"]),
                 inp["w2"], inp["b2"])
    if "embeds" in inp:
        y = inp["embeds"].masked_scatter(inp["image_mask"][..., None], y)
    return y


def _mmfast(inp):
    args = (inp["x"], inp["w1"], inp["b1"], inp["w2"], inp["b2"])
    if "embeds" in inp:
        return mmfast.ops.projector_splice(*args, inp["embeds"], inp["image_mask"],
                                           inp["approximate"])
    return mmfast.ops.projector(*args, inp["approximate"])


def _mmfast_prepacked():
    """mmfast.nn.Projector with prepack(): the inference forward from weights packed once (the
    packing runs in the harness's warm-up call; the packed copies, as large as w1 and w2, stay
    out of the peak column because they outlive the call)."""
    held = {}

    def run(inp):
        if held.get("inputs") is not inp:
            w1, b1, w2, b2 = (inp[k] for k in ("w1", "b1", "w2", "b2"))
            proj = mmfast.nn.Projector(w1.shape[1], w1.shape[0], w2.shape[0],
                                       approximate=inp["approximate"], bias=b1 is not None,
                                       device=w1.device, dtype=w1.dtype).eval()
            with torch.no_grad():
                for lin, w, b in ((proj.linear_1, w1, b1), (proj.linear_2, w2, b2)):
                    lin.weight.copy_(w)
                    if b is not None:
                        lin.bias.copy_(b)
            held.update(inputs=inp, proj=proj.prepack())
        return held["proj"](inp["x"])
    return run


def _prepack_supports(case, dtype, mode):
    if mode != "forward":
        return "inference only (the packed weights serve forwards without autograd)"
    if "splice" in case.params:
        return "projector only"
    if dtype != "bfloat16":
        return "bfloat16 only"
    if not torch.ops.mmfast._cpu_bf16_tile_gemm():
        return f"bfloat16 GEMMs here: {mmfast.cpu_bf16_gemm()}"
    return None


def _flash_attn_mlp(inp):
    from flash_attn.ops.fused_dense import fused_mlp_func

    y = fused_mlp_func(inp["x"], inp["w1"], inp["w2"], inp["b1"], inp["b2"],
                       activation="gelu_approx")
    if "embeds" in inp:
        y = inp["embeds"].masked_scatter(inp["image_mask"][..., None], y)
    return y


def _training_only(case, dtype, mode):
    if mode != "forward" and not getattr(case, "training", True):
        return "an inference case: forward only"
    return None


def _peer_supports(case, dtype, mode):
    reason = _training_only(case, dtype, mode)
    if reason:
        return reason
    try:
        import flash_attn.ops.fused_dense  # noqa: F401
    except ImportError:
        return "flash-attn's fused_dense is not installed"
    if not torch.cuda.is_available():
        return "flash-attn's fused MLP runs on CUDA only"
    if case.params["gelu"] != "tanh":
        return "flash-attn's fused MLP has only the tanh GELU"
    if dtype == "float32":
        return "flash-attn's fused MLP takes float16/bfloat16 only"
    return None


def providers(device):
    implementation = mmfast_implementation(OP, device)
    return [
        Provider("eager nn.Sequential (+ masked_scatter)", _eager, "eager",
                 supports=_training_only),
        Provider("torch.compile", compiled(_eager), "compile", supports=_training_only),
        Provider("mmfast", _mmfast, "mmfast", implementation=implementation,
                 supports=_training_only),
        Provider("flash-attn FusedMLP", _flash_attn_mlp, "peer", supports=_peer_supports),
    ] + ([Provider("mmfast prepacked", _mmfast_prepacked(), "mmfast",
                   implementation=implementation, supports=_prepack_supports)]
         if device.type == "cpu" else [])
