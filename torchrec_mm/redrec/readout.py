"""Runs a transformer whose output is read at a few positions only.

Both RED-Rec towers read their transformer at a handful of positions: the user tower at
its ``K`` interest queries after ``last_n`` events (paper ``001_42c7267e32b49bc6``
§3.2), the item tower at the special token of each item (appendix C). Every other
position of the *last* layer is computed and thrown away. In that layer only the keys
and values need every position; the queries, the attention output, the feed-forward
block and both layer norms are needed at the read positions only. For a BERT-family
layer (MiniLM, BERT, RoBERTa, ELECTRA, ...: ``attention.self.{query,key,value}``,
``attention.output``, ``intermediate``, ``output``) that is ``2 H^2`` of the
``~12 H^2`` multiply-adds per position, so the last layer costs about a sixth: a
2-layer user tower about 0.6x, a 1-layer item tower about 0.2x of the full forward
(backward alike).

With one or a few read positions even the keys and values need not be projected: the
score of a query ``q`` against position ``t`` in head ``h`` is ``q_h . (W_k,h x_t +
b_k,h) = (q_h W_k,h) . x_t + q_h . b_k,h``, and its context is ``W_v,h (sum_t a_t x_t)
+ b_v,h sum_t a_t``. Taking the query into the hidden space costs ``H^2`` per read
position instead of ``2 T H^2`` per row, for ``2 T H`` per head and read position
(the "absorbed" form, as in latent-attention decoders). Which form runs is chosen by
multiply-add count (the item tower's single ``[EMB]`` read: absorbed).

:func:`forward_at` runs the model's own code up to the last layer (its embedding
layer, mask handling and lower layers, unchanged), then the last layer at the read
positions from the same weights. The result equals the full forward's rows (float
rounding; tested). Models whose last layer is not of that form (decoder-only models
with a final norm, cross-attention, ...) run the full forward and are read at the same
positions: the same values, without the saving.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["forward_at", "layer_stack", "named_layer_stack", "supports_fast_readout"]


def named_layer_stack(lm: nn.Module) -> Tuple[str, nn.ModuleList]:
    """``(name, stack)`` of the model's transformer layers (the ``nn.ModuleList`` with
    ``num_hidden_layers`` entries); raises if there is none."""
    total = int(lm.config.get_text_config().num_hidden_layers)
    for name, m in lm.named_modules():
        if name and isinstance(m, nn.ModuleList) and len(m) == total:
            return name, m
    raise ValueError(f"no stack of {total} layers found in {type(lm).__name__}")


def layer_stack(lm: nn.Module) -> nn.ModuleList:
    """The model's stack of transformer layers (:func:`named_layer_stack`)."""
    return named_layer_stack(lm)[1]


def _bert_layer_parts(layer: nn.Module) -> Optional[nn.Module]:
    """The self-attention module of a BERT-family encoder layer, or ``None`` if
    ``layer`` is not one (then the fast path does not apply)."""
    attention = getattr(layer, "attention", None)
    sa = getattr(attention, "self", None)
    if sa is None or not all(isinstance(getattr(sa, a, None), nn.Linear)
                             for a in ("query", "key", "value")):
        return None
    if not all(isinstance(getattr(o, "dense", None), nn.Linear)
               for o in (getattr(attention, "output", None), getattr(layer, "intermediate", None),
                         getattr(layer, "output", None))):
        return None
    if getattr(layer, "is_decoder", False) or getattr(layer, "add_cross_attention", False) \
            or getattr(sa, "is_causal", False) or getattr(sa, "position_embedding_type",
                                                          "absolute") != "absolute":
        return None
    if not isinstance(getattr(sa, "num_attention_heads", None), int):
        return None
    return sa


def _fast_last_layer(lm: nn.Module) -> Optional[Tuple[nn.Module, nn.Module]]:
    """``(last layer, its self-attention)`` when the fast path applies, else ``None``."""
    try:
        stack = layer_stack(lm)
    except ValueError:
        return None
    text_cfg = lm.config.get_text_config()
    if getattr(text_cfg, "is_decoder", False) or getattr(text_cfg, "add_cross_attention", False):
        return None
    # a norm or projection after the stack (decoder-only LMs) would be skipped
    if any(getattr(lm, a, None) is not None for a in ("norm", "final_layer_norm", "ln_f")):
        return None
    sa = _bert_layer_parts(stack[-1])
    return None if sa is None else (stack[-1], sa)


def supports_fast_readout(lm: nn.Module) -> bool:
    """Whether :func:`forward_at` computes ``lm``'s last layer at the read positions
    only (a BERT-family encoder whose last layer's output is the model's output)."""
    return _fast_last_layer(lm) is not None


class _ReachedLastLayer(Exception):
    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


def _stop_before(module: nn.Module, args, kwargs):
    hidden = args[0] if args else kwargs["hidden_states"]
    raise _ReachedLastLayer(hidden)


def _attention_absorbed(sa: nn.Module, x_at: torch.Tensor, hidden: torch.Tensor,
                        mask: torch.Tensor, scale: float, dropout: float) -> torch.Tensor:
    """Self-attention of ``P`` queries per row over ``T`` positions without projecting
    the ``T`` keys and values: per head, ``q W_k`` is taken back to the hidden space and
    scored against ``hidden`` directly; the attention-weighted ``hidden`` is projected
    by ``W_v`` once. ``[B, P, H]`` queries' inputs, ``[B, T, H]`` -> ``[B, P, A]``."""
    B, P, H = x_at.shape
    heads = int(sa.num_attention_heads)
    q = sa.query(x_at).view(B, P, heads, -1)                                # [B, P, h, d]
    d = q.shape[-1]
    w_k = sa.key.weight.view(heads, d, H)
    scores = torch.einsum("bphk,btk->bpht", torch.einsum("bphd,hdk->bphk", q, w_k), hidden)
    if sa.key.bias is not None:  # constant along t (cancels in the softmax), kept in the graph
        scores = scores + (q * sa.key.bias.view(heads, d)).sum(-1, keepdim=True)
    scores = (scores * scale).masked_fill(~mask[:, None, None, :], float("-inf"))
    weights = F.dropout(torch.softmax(scores, -1), dropout, training=dropout > 0)
    u = torch.einsum("bpht,btk->bphk", weights, hidden)                     # [B, P, h, H]
    ctx = torch.einsum("bphk,hdk->bphd", u, sa.value.weight.view(heads, d, H))
    if sa.value.bias is not None:  # the weights sum to 1 (to its dropout's sum in training)
        ctx = ctx + weights.sum(-1, keepdim=True) * sa.value.bias.view(heads, d)
    return ctx.reshape(B, P, heads * d)


def _absorbed_is_cheaper(B: int, T: int, P: int, H: int, heads: int) -> bool:
    """Multiply-adds of the two attention forms (the query projection and everything
    after the context are the same in both)."""
    projected = 2 * T * H * H + 2 * P * T * H           # K, V over T positions; QK^T, AV
    absorbed = 2 * P * H * H + 2 * P * T * H * heads    # q W_k, u W_v; scores and sums in H
    return absorbed < projected


def _last_layer_at(layer: nn.Module, sa: nn.Module, hidden: torch.Tensor,
                   mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                   absorbed: Optional[bool] = None) -> torch.Tensor:
    """A BERT-family layer at ``(rows, cols)`` only. ``hidden [B, T, H]`` its input,
    ``mask [B, T]`` bool (True = a token), ``rows, cols [B, P]`` -> ``[B, P, H]``.
    ``absorbed``: the attention form (``None``: the cheaper for these sizes)."""
    B, T, H = hidden.shape
    P = rows.shape[1]
    heads = int(sa.num_attention_heads)
    x_at = hidden[rows, cols]                                               # [B, P, H]
    scale = getattr(sa, "scaling", None)
    if scale is None:
        scale = (H // heads) ** -0.5
    dropout = float(sa.dropout.p) if sa.training and isinstance(
        getattr(sa, "dropout", None), nn.Dropout) else 0.0
    if absorbed is None:
        absorbed = _absorbed_is_cheaper(B, T, P, H, heads)
    if absorbed:
        ctx = _attention_absorbed(sa, x_at, hidden, mask, float(scale), dropout)
    else:
        q = sa.query(x_at).view(B, P, heads, -1).transpose(1, 2)            # [B, h, P, d]
        k = sa.key(hidden).view(B, T, heads, -1).transpose(1, 2)            # [B, h, T, d]
        v = sa.value(hidden).view(B, T, heads, -1).transpose(1, 2)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :],
                                             dropout_p=dropout, scale=float(scale))
        ctx = ctx.transpose(1, 2).reshape(B, P, -1)
    attn = layer.attention.output(ctx, x_at)
    return layer.output(layer.intermediate(attn), attn)


def forward_at(lm: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
               rows: torch.Tensor, cols: torch.Tensor, fast: Optional[bool] = None,
               absorbed: Optional[bool] = None,
               position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``lm``'s last hidden states at the given positions.

    Args:
        lm: a Hugging Face base model (``AutoModel``) that takes ``inputs_embeds``.
        inputs_embeds: ``[B, T, H]``.
        attention_mask: ``[B, T]`` (1 / True = a token).
        rows, cols: ``[B, P]`` int64, the positions to read (``rows[b]`` is usually
            ``b``); every read position must be a token.
        fast: ``None`` = the fast path where :func:`supports_fast_readout`, ``False`` =
            always the full forward (the reference).
        absorbed: the fast path's attention form: keys and values projected over every
            position (``False``) or the query taken into the hidden space
            (``True``); ``None`` = the one with fewer multiply-adds.
        position_ids: ``[B, T]`` passed to ``lm`` (``None``: the LM's own, 0..T-1).

    Returns:
        ``[B, P, H]``, equal to ``lm(...).last_hidden_state[rows, cols]``.
    """
    mask = attention_mask.to(torch.bool)
    # only when given: an LM's forward need not take position_ids
    extra = {} if position_ids is None else {"position_ids": position_ids}
    parts = _fast_last_layer(lm) if fast is not False else None
    if parts is None:
        if fast:
            raise ValueError(f"forward_at: {type(layer_stack(lm)[-1]).__name__} is not a "
                             "BERT-family layer")
        h = lm(inputs_embeds=inputs_embeds, attention_mask=mask.long(),
               **extra).last_hidden_state
        return h[rows, cols]
    last, sa = parts
    handle = last.register_forward_pre_hook(_stop_before, with_kwargs=True)
    try:
        lm(inputs_embeds=inputs_embeds, attention_mask=mask.long(), **extra)
    except _ReachedLastLayer as stop:
        hidden = stop.hidden
    else:  # pragma: no cover - the hook always fires
        raise RuntimeError("forward_at: the last layer was not reached")
    finally:
        handle.remove()
    return _last_layer_at(last, sa, hidden, mask, rows, cols, absorbed)
