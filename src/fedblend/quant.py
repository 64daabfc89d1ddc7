"""4-bit NF4 weights for a frozen backbone (bitsandbytes, optional double quantization).

``nn.Linear`` layers become ``bnb.nn.Linear4bit`` (so PEFT LoRA on top is QLoRA). Conv layers
(EfficientNet) keep their weights packed as NF4 and dequantize them on each forward pass:
bitsandbytes has no 4-bit conv, but the memory saving is the same. Everything runs on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NF4Conv2d(nn.Module):
    """A frozen conv whose weight is stored as NF4 (packed uint8 + block scales)."""

    def __init__(self, conv: nn.Conv2d, double_quant: bool, blocksize: int = 64) -> None:
        super().__init__()
        import bitsandbytes.functional as bf

        self.shape = tuple(conv.weight.shape)
        packed, self.quant_state = bf.quantize_4bit(
            conv.weight.data.float().contiguous(), blocksize=blocksize, quant_type="nf4",
            compress_statistics=double_quant,
        )
        self.register_buffer("packed", packed)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.data.clone())
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        # TF-style "same" padding of the EfficientNet convs lives in a submodule or in forward
        self.static_padding = getattr(conv, "static_padding", None)
        self.dynamic_same = type(conv).__name__ == "Conv2dDynamicSamePadding"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as bf

        w = bf.dequantize_4bit(self.packed, self.quant_state).view(self.shape).to(x.dtype)
        if self.static_padding is not None:
            x = self.static_padding(x)
        elif self.dynamic_same:
            ih, iw = x.shape[-2:]
            kh, kw = self.shape[-2:]
            sh, sw = self.stride
            oh, ow = -(-ih // sh), -(-iw // sw)
            ph = max((oh - 1) * sh + (kh - 1) * self.dilation[0] + 1 - ih, 0)
            pw = max((ow - 1) * sw + (kw - 1) * self.dilation[1] + 1 - iw, 0)
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _nf4_linear(lin: nn.Linear, double_quant: bool) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(
        lin.in_features, lin.out_features, bias=lin.bias is not None,
        compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4",
    )
    q.weight = bnb.nn.Params4bit(
        lin.weight.data.float().contiguous(), requires_grad=False,
        compress_statistics=double_quant, quant_type="nf4",
    )
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # moving to a device is what quantizes a Params4bit


def quantize_nf4(model: nn.Module, double_quant: bool = True, min_params: int = 1024,
                 convs: bool = True) -> int:
    """Replace Linear (and, with ``convs``, dense Conv2d) layers of >= ``min_params`` weights
    by NF4 ones in place. Returns the number of layers quantized."""
    # bitsandbytes' CPU (de)quantization is wrapped in torch.compile, which recompiles for
    # every weight shape (a minute for EfficientNet); eager mode is as fast here.
    torch._dynamo.config.disable = True
    n = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear) and child.weight.numel() >= min_params:
            setattr(model, name, _nf4_linear(child, double_quant))
            n += 1
        elif (convs and isinstance(child, nn.Conv2d) and child.groups == 1
              and child.weight is not None and child.weight.numel() >= min_params):
            # depthwise convs (9 weights per channel) stay fp32: NF4 blocks spanning channels
            # of very different scale wreck them, and they hold few of the weights
            setattr(model, name, NF4Conv2d(child, double_quant))
            n += 1
        else:
            n += quantize_nf4(child, double_quant, min_params, convs)
    return n


def quant_state_bytes(qs) -> int:
    if qs is None:
        return 0
    n = qs.absmax.numel() * qs.absmax.element_size() + qs.code.numel() * qs.code.element_size()
    if getattr(qs, "nested", False) and qs.state2 is not None:
        n += quant_state_bytes(qs.state2) + qs.offset.numel() * qs.offset.element_size()
    return n


def module_bytes(model: nn.Module) -> int:
    """Bytes the module's weights occupy in memory: parameters, buffers and NF4 block scales."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
        total += quant_state_bytes(getattr(t, "quant_state", None))
    for m in model.modules():
        if isinstance(m, NF4Conv2d):
            total += quant_state_bytes(m.quant_state)
    return total
