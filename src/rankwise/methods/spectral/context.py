"""What a spectral layer needs to know about the current forward pass.

Gates and budgets are defined over a sequence's *non-padding* tokens, but an ``nn.Linear``
deep inside an encoder only sees hidden states. :func:`install_forward_context` therefore
hooks the top-level model: a forward pre-hook stores the batch's attention mask in a shared
:class:`ForwardContext` (from ``attention_mask``, or all-ones shaped like ``input_ids`` /
``inputs_embeds`` when none is given), and a forward hook closes the batch (statistics) and
clears the mask afterwards.

DeBERTa-v2/v3 with ``share_att_key`` re-uses ``query_proj`` / ``key_proj`` on the
relative-position embeddings inside ``disentangled_attention_bias``. Those rows are not
tokens of any example (no mask; one set of 2·span rows per forward, shared by the whole
batch), and their count 2·span can equal a batch's length, so shape alone cannot tell them
apart. The attention modules' ``disentangled_attention_bias`` is wrapped so that calls made
inside it are marked as position rows; the layers adapt them like tokens but keep them out of
the per-example accounting (``layer.py``, ``SpectralLinear._forward_position_rows``).

Every hooked forward also gets a fresh ``forward_id``, so that a layer can draw one
input-independent gate sample (BHSP) per forward and reuse it on the token and the
position rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class ForwardContext:
    """Shared by all spectral layers of one model; written by the model-level hooks."""

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None  # (B, T), 1 = real token
        self.non_token_depth = 0  # > 0 while inside a relative-position projection
        self.statistics: Any = None  # a GateStatistics while an evaluation is recorded
        self.forward_id: int | None = None  # set for the duration of a hooked model forward
        self._forwards = 0

    @property
    def in_non_token_call(self) -> bool:
        return self.non_token_depth > 0

    def begin_forward(self) -> None:
        self._forwards += 1
        self.forward_id = self._forwards

    @contextlib.contextmanager
    def non_token_inputs(self) -> Iterator[None]:
        self.non_token_depth += 1
        try:
            yield
        finally:
            self.non_token_depth -= 1

    def valid_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Non-padding mask (B, T) bool for a token input ``x`` of shape (B, T, d_in)."""
        batch, length = x.shape[0], x.shape[1]
        if self.attention_mask is None:  # layer used outside a hooked model forward
            return torch.ones(batch, length, dtype=torch.bool, device=x.device)
        if tuple(self.attention_mask.shape) != (batch, length):
            raise RuntimeError(
                f"spectral layer input of shape {tuple(x.shape)} does not match the batch's "
                f"attention mask {tuple(self.attention_mask.shape)}: this architecture feeds a "
                "target layer something other than token states; exclude that layer from "
                "model.target_modules"
            )
        return self.attention_mask.to(device=x.device, dtype=torch.bool)


def _mask_from_inputs(args: tuple, kwargs: dict) -> torch.Tensor | None:
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]  # HF positional order: (input_ids, attention_mask, ...)
    if mask is not None:
        return mask
    ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if ids is not None:
        return torch.ones(ids.shape[:2], dtype=torch.long, device=ids.device)
    embeds = kwargs.get("inputs_embeds")
    if embeds is not None:
        return torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    return None


def install_forward_context(model: nn.Module, context: ForwardContext) -> list[RemovableHandle]:
    """Register the mask hooks on ``model`` and mark DeBERTa's position projections.

    Returns the hook handles (``handle.remove()`` undoes the hooks; the attention wrappers
    stay, they are inert without spectral layers).
    """
    hooks = _MaskHooks(context)
    handles = [
        model.register_forward_pre_hook(hooks.store_mask, with_kwargs=True),
        model.register_forward_hook(hooks.clear_mask, with_kwargs=True, always_call=True),
    ]
    for module in model.modules():
        original = getattr(module, "disentangled_attention_bias", None)
        if callable(original) and not isinstance(original, _MarkedNonToken):
            module.disentangled_attention_bias = _MarkedNonToken(module, context)
    return handles


class _MaskHooks:
    """The model-level hooks: store the batch's mask before the forward, clear it after. An
    object holding the context, not a closure over it, so that ``copy.deepcopy`` of the model
    gives the copy hooks that write the copy's context (a copied closure is the same function,
    writing the original's)."""

    def __init__(self, context: ForwardContext):
        self.context = context

    def store_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = _mask_from_inputs(args, kwargs)
        if mask is not None and mask.dim() != 2:
            raise RuntimeError(f"attention_mask must be (batch, tokens), got {tuple(mask.shape)}")
        self.context.attention_mask = mask
        self.context.begin_forward()
        if self.context.statistics is not None:
            self.context.statistics.begin_batch(mask)

    def clear_mask(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.context.statistics is not None:
            self.context.statistics.end_batch()
        self.context.attention_mask = None
        self.context.forward_id = None


class _MarkedNonToken:
    """``module.disentangled_attention_bias`` run with ``context`` marking position rows.

    A plain object holding the module and the context (not a closure over them), so that
    ``copy.deepcopy`` of the model gives the copy a marker bound to the copied module and its
    copied context; a closure would keep calling the original model's projections.
    """

    def __init__(self, module: nn.Module, context: ForwardContext):
        self.module = module
        self.context = context
        self.function = type(module).disentangled_attention_bias

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.context.non_token_inputs():
            return self.function(self.module, *args, **kwargs)
