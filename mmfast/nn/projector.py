"""Projector: the VLM adapter (LLaVA's mlp{depth}x_gelu, HF LlavaMultiModalProjector) over
mmfast.ops.projector, with the parameter names of the checkpoints it replaces."""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import mmfast
from mmfast.ops.projector import projector

KEY_STYLES = ("hf", "llava")

# GELU modules of torch and transformers, by class name, and the GELU form they compute.
# transformers' tanh-form activations (gelu_pytorch_tanh, gelu_new, gelu_fast) all evaluate
# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))); its "gelu" is the exact form.
_GELU_FORMS = {
    "GELUActivation": "none",
    "PytorchGELUTanh": "tanh",
    "GELUTanh": "tanh",
    "NewGELUActivation": "tanh",
    "FastGELUActivation": "tanh",
}


def _gelu_form(act: nn.Module) -> str:
    if isinstance(act, nn.GELU):
        return act.approximate
    form = _GELU_FORMS.get(type(act).__name__)
    if form is None:
        raise ValueError(f"Projector.from_module: activation {type(act).__name__} is not a GELU "
                         "(mmfast's projector computes Linear -> GELU -> Linear)")
    return form


def _layer_name(i: int, key_style: str) -> str:
    """Name of the i-th Linear (0-based): linear_{i+1} (HF) or the nn.Sequential index 2i
    (LLaVA: Linear, GELU, Linear, GELU, ...)."""
    return f"linear_{i + 1}" if key_style == "hf" else str(2 * i)


class Projector(nn.Module):
    """Linear(in, hidden) -> GELU -> Linear(hidden, hidden) -> ... -> GELU -> Linear(hidden, out),
    `depth` Linears in all (LLaVA's mlp{depth}x_gelu; depth=2 is HF LlavaMultiModalProjector).

    The first two Linears and the GELU between them run as one fused mmfast.ops.projector
    (which keeps only its input and pre-activation for the backward); deeper layers follow as
    GELU -> Linear.

    Parameters live in nn.Linear submodules named like the checkpoint being replaced:
    key_style="hf": linear_1, linear_2, ... (LlavaMultiModalProjector); key_style="llava":
    0, 2, 4, ... (LLaVA's nn.Sequential). load_state_dict accepts either naming.

    x: [..., in_features] -> [..., out_features].

    For inference on CPUs where mmfast runs bfloat16 GEMMs on its own tiles, prepack() packs
    the fused Linears' weights once instead of on every forward.
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int, depth: int = 2,
                 approximate: str = "none", bias: bool = True, *, key_style: str = "hf",
                 device=None, dtype=None):
        super().__init__()
        if depth < 2:
            raise ValueError(f"Projector: depth must be at least 2 (Linear, GELU, Linear), got {depth}")
        if approximate not in ("none", "tanh"):
            raise ValueError(f"Projector: approximate must be 'none' or 'tanh', got {approximate!r}")
        if key_style not in KEY_STYLES:
            raise ValueError(f"Projector: key_style must be one of {KEY_STYLES}, got {key_style!r}")
        self.depth = depth
        self.approximate = approximate
        self.key_style = key_style
        dims = [in_features] + [hidden_features] * (depth - 1) + [out_features]
        for i in range(depth):
            self.add_module(_layer_name(i, key_style),
                            nn.Linear(dims[i], dims[i + 1], bias=bias, device=device, dtype=dtype))
        self._register_load_state_dict_pre_hook(self._rename_foreign_keys)
        # (identity of the packed weights, w1 packed, w2 packed) after prepack(), else None
        self._packed = None

    @property
    def linears(self) -> list[nn.Linear]:
        return [getattr(self, _layer_name(i, self.key_style)) for i in range(self.depth)]

    def prepack(self) -> "Projector":
        """Packs the weights of the first two Linears once, in the layout of mmfast's bfloat16
        tile GEMMs (CPU, AMX or avx512_bf16: see mmfast.cpu_bf16_gemm()), so that forward
        calls without autograd skip packing them (the op otherwise packs them on every call:
        ~2% of SigLIP's forward in a profile). The packed copies take as much memory again as
        the two weights. They follow in-place changes that PyTorch counts (optimizer steps,
        load_state_dict, copy_ under no_grad): forward repacks when a weight's version moved.
        A change through `.data` is not counted: call prepack() again after one. train(True)
        drops the copies. Where the tiles do not run (other CPUs or dtypes, CUDA), it warns and
        packs nothing. Under torch.compile the module runs the op, which packs per call (the
        identity check compares data pointers, which a compiled graph cannot guard on).
        Returns self."""
        first, second = self.linears[:2]
        reason = self._prepack_unsupported(first.weight, second.weight)
        if reason:
            warnings.warn(f"Projector.prepack: nothing packed: {reason}", stacklevel=2)
            self._packed = None
        else:
            self._packed = self._pack(first.weight, second.weight)
        return self

    @staticmethod
    def _prepack_unsupported(*weights) -> str | None:
        for w in weights:
            if w.device.type != "cpu" or w.dtype != torch.bfloat16:
                return (f"packed weights are for bfloat16 on CPU, the weights are {w.dtype} on "
                        f"{w.device}")
        if not torch.ops.mmfast._cpu_bf16_tile_gemm():
            return (f"this CPU's bfloat16 GEMMs run in {mmfast.cpu_bf16_gemm()}, not on mmfast's "
                    "tiles")
        return None

    @staticmethod
    def _identity(*weights):
        return tuple((w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape))
                     for w in weights)

    def _pack(self, w1, w2):
        with torch.no_grad():
            return (self._identity(w1, w2), torch.ops.mmfast._projector_pack_weight(w1),
                    torch.ops.mmfast._projector_pack_weight(w2))

    def _packed_for(self, x, first, second):
        """The packed weights for this call, repacked if a weight changed; None when the call
        needs autograd or nothing was packed."""
        if self._packed is None or torch.compiler.is_compiling():
            return None
        params = (x, first.weight, first.bias, second.weight, second.bias)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params):
            return None
        if self._packed[0] != self._identity(first.weight, second.weight):
            reason = self._prepack_unsupported(first.weight, second.weight)
            if reason:
                warnings.warn(f"Projector: packed weights dropped: {reason}", stacklevel=3)
                self._packed = None
                return None
            self._packed = self._pack(first.weight, second.weight)
        return self._packed[1:]

    def train(self, mode: bool = True) -> "Projector":
        if mode:
            self._packed = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second, *rest = self.linears
        packed = self._packed_for(x, first, second)
        if packed is not None:
            y = torch.ops.mmfast._projector_prepacked(x, first.weight, packed[0], first.bias,
                                                      second.weight, packed[1], second.bias,
                                                      self.approximate)
        else:
            y = projector(x, first.weight, first.bias, second.weight, second.bias,
                          self.approximate)
        for layer in rest:
            y = F.linear(F.gelu(y, approximate=self.approximate), layer.weight, layer.bias)
        return y

    def _rename_foreign_keys(self, state_dict, prefix, *args):
        """Maps the other checkpoint naming (HF linear_k <-> LLaVA Sequential index) onto ours."""
        other = "llava" if self.key_style == "hf" else "hf"
        for i in range(self.depth):
            for p in ("weight", "bias"):
                theirs = f"{prefix}{_layer_name(i, other)}.{p}"
                ours = f"{prefix}{_layer_name(i, self.key_style)}.{p}"
                if theirs in state_dict and ours not in state_dict:
                    state_dict[ours] = state_dict.pop(theirs)

    @classmethod
    def from_module(cls, module: nn.Module) -> "Projector":
        """A Projector with the weights, GELU form, dtype and device of `module`: an HF
        LlavaMultiModalProjector (linear_1, act, linear_2) or a LLaVA nn.Sequential
        (Linear, GELU, Linear[, GELU, Linear ...]). Its state_dict keys are the module's."""
        if isinstance(module, nn.Sequential):
            parts = list(module)
            linears, acts = parts[0::2], parts[1::2]
            if len(parts) < 3 or len(parts) % 2 == 0 or not all(
                    isinstance(m, nn.Linear) for m in linears):
                raise ValueError("Projector.from_module: expected nn.Sequential(Linear, GELU, "
                                 f"Linear[, GELU, Linear ...]), got {module}")
            key_style = "llava"
        elif all(hasattr(module, n) for n in ("linear_1", "linear_2", "act")):
            linears, acts = [module.linear_1, module.linear_2], [module.act]
            key_style = "hf"
        else:
            raise ValueError("Projector.from_module: expected an HF LlavaMultiModalProjector or a "
                             f"LLaVA nn.Sequential projector, got {type(module).__name__}")
        forms = {_gelu_form(a) for a in acts}
        if len(forms) != 1:
            raise ValueError(f"Projector.from_module: mixed GELU forms {sorted(forms)}")
        biases = {m.bias is not None for m in linears}
        if len(biases) != 1:
            raise ValueError("Projector.from_module: some Linears have a bias and others not")
        first = linears[0]
        new = cls(first.in_features, first.out_features, linears[-1].out_features,
                  depth=len(linears), approximate=forms.pop(), bias=biases.pop(),
                  key_style=key_style, device=first.weight.device, dtype=first.weight.dtype)
        new.load_state_dict(module.state_dict())
        return new

    def extra_repr(self) -> str:
        return f"depth={self.depth}, approximate={self.approximate!r}, key_style={self.key_style!r}"
