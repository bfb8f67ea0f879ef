"""PiSSA — principal singular values and singular vectors adaptation (Meng et al., NeurIPS
2024; docs/methods.md#pissa) through peft ``LoraConfig(init_lora_weights="pissa")``: not
re-implemented.

LoRA's factors start on the top-r singular triplets of each target instead of (Kaiming, 0):
with W = U S Vᵀ and s = lora_alpha / r,

    A = diag(√(S_r / s)) V_rᵀ,   B = U_r diag(√(S_r / s)),   W_res = W − s·B A,

so the adapter trains the principal directions (those the spectral family gates) and the
frozen base keeps the residual; W_res + s·B A = W, so the step-0 model is the backbone (to
float rounding of the exact SVD). The residual is a function of W alone: a fresh wrap of the
same backbone recomputes it, so the checkpoint (A, B and the head) restores the model.

Cost (docs/methods.md#cost-shapes): LoRA's, 2·r·(d_in + d_out) per token; the SVD runs once at
wrap time, no cost per forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from torch import nn

from rankwise.methods.lora import LoRA, LoRAConfig


@dataclass
class PiSSAConfig(LoRAConfig):
    #: Selects PiSSA (LoRA's keys, factors initialised on the top-`rank` singular triplets; its
    #: importance-weighted twin with `model.importance_weighted_regularisation.enabled`).
    type: Literal["pissa"] = "pissa"


class PiSSA(LoRA):
    name = "pissa"

    def peft_config(self, backbone: nn.Module, target_modules: list[str]):
        # the exact SVD ("pissa"), not the randomised "pissa_niter_<n>": deterministic
        return dataclasses.replace(super().peft_config(backbone, target_modules), init_lora_weights="pissa")
