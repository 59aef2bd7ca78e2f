"""Model FLOPs of a T5 training step, and model FLOPs utilisation (MFU).

Counted per example from its non-pad lengths (Le input tokens, Ld target tokens), attention in
full (PaLM's convention, arXiv 2204.02311 App. B), forward + backward = 3 x forward:

    FLOPs = 6 (Pe Le + Pd Ld) + 12 d_attn (Le^2 n_enc + (Ld^2 + Le Ld) n_dec)

Pe: the matrix weights run once per input token (encoder layers, and the decoder's cross-attention
keys and values, computed from the encoder's states); Pd: those run once per target token (the
decoder's self-attention, cross-attention query and output, feed-forward, and the LM head).
Embedding lookups, norms and the position bias are not matrix products and are left out. Pad
tokens are work the card does but the model does not need: MFU counts real tokens only, so padding
shows up as lost utilisation. The Trainer's `total_flos` (6 x parameters x input tokens) leaves out
the targets and the head: about 2.6x too low at the paper's 128/400 lengths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

#: Dense (not "with sparsity") peak FLOP/s by card and precision, from NVIDIA's datasheets; the
#: first name fragment found in the device name wins. `FSA_PEAK_TFLOPS` overrides for other cards.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bf16": 835.0, "tf32": 417.0, "fp32": 60.0}),
    ("H200", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "tf32": 417.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    ("A10G", {"bf16": 70.0, "tf32": 35.0, "fp32": 31.2}),
    ("L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
)


@dataclass(frozen=True)
class T5Flops:
    """The matrix-weight counts and attention sizes of one T5 model (see the module docstring)."""

    per_input_token: int  # Pe
    per_target_token: int  # Pd
    attn_dim: int  # heads x d_kv
    enc_layers: int
    dec_layers: int

    @classmethod
    def of(cls, model: Any) -> T5Flops | None:
        """Count from the model's own named parameters (so any T5 size, tied head or not); None for a
        model that is not a T5 (a BART student, say): its tokens are still counted, its FLOPs not."""
        cfg = model.config
        if not all(hasattr(cfg, key) for key in ("num_heads", "d_kv", "num_layers", "num_decoder_layers")):
            return None
        pe = pd = 0
        seen: set[int] = set()
        for name, p in model.named_parameters():
            if p.dim() != 2 or "relative_attention_bias" in name or id(p) in seen:
                continue
            seen.add(id(p))
            if name.startswith("encoder.block."):
                pe += p.numel()
            elif name.startswith("decoder.block."):
                cross_kv = ".EncDecAttention.k." in name or ".EncDecAttention.v." in name
                if cross_kv:
                    pe += p.numel()
                else:
                    pd += p.numel()
        head = model.get_output_embeddings()
        pd += head.weight.numel()  # the LM head runs per target token even when tied to the embeddings
        return cls(pe, pd, cfg.num_heads * cfg.d_kv, cfg.num_layers, cfg.num_decoder_layers)

    def batch(self, enc_lengths: Any, dec_lengths: Any) -> Any:
        """Training FLOPs of a batch from per-example non-pad lengths (tensors: the sum stays on
        their device, so counting needs no host sync)."""
        le, ld = enc_lengths.double(), dec_lengths.double()
        linear = 6.0 * (self.per_input_token * le + self.per_target_token * ld)
        attention = 12.0 * self.attn_dim * (self.enc_layers * le * le + self.dec_layers * (ld * ld + le * ld))
        return (linear + attention).sum()


def peak_flops(device: Any, precision: str) -> float | None:
    """The card's dense peak FLOP/s for `precision` (bf16, tf32, fp32), or None when unknown
    (a CPU, an unlisted card): then no MFU is reported. `FSA_PEAK_TFLOPS` (a number) overrides."""
    if os.environ.get("FSA_PEAK_TFLOPS"):
        return float(os.environ["FSA_PEAK_TFLOPS"]) * 1e12
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in name:
            return peaks[precision] * 1e12
    return None
