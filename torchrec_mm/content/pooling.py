"""Attention pooling ``g(H)`` of IDProxy (section 3.1.2): a content embedding
``z = g(H) = sum_t softmax_t(<H_t, q> / sqrt(D)) H_t`` over the valid tokens of a
sequence (prompt tokens including ``[EMB]``).

The query ``q`` is learnable and zero-initialised, so an untrained ``g`` is exactly
masked mean pooling; IDProxy stage 1 trains it together with the encoder, stage 2
re-applies the same ``g`` to the hidden states of each layer group.
"""

import math
from typing import Optional

import torch
from torch import nn


class AttentionPooling(nn.Module):
    """Single-query dot-product attention pooling over tokens.

    Args:
        dim: hidden size ``D`` of the token states.
        scale: score scale; defaults to ``1 / sqrt(D)``.

    Example::

        pool = AttentionPooling(384)
        z = pool(hidden, attention_mask)  # [B, T, D], [B, T] -> [B, D]
    """

    def __init__(self, dim: int, scale: Optional[float] = None) -> None:
        super().__init__()
        self.dim = dim
        self.scale = float(scale) if scale is not None else 1.0 / math.sqrt(dim)
        self.query = nn.Parameter(torch.zeros(dim))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            hidden: ``[..., T, D]`` token states (e.g. ``[B, T, D]`` or ``[B, L, T, D]``).
            mask: ``[..., T]`` bool/0-1 mask of valid tokens, broadcastable to
                ``hidden.shape[:-1]`` (e.g. ``[B, T]`` or ``[B, 1, T]``).

        Returns:
            ``[..., D]`` pooled states, in ``hidden.dtype``. Rows without a valid
            token pool to zeros.
        """
        valid = mask.to(torch.bool)
        h = hidden.float()
        scores = torch.matmul(h, self.query.float()) * self.scale  # [..., T]
        scores = scores.masked_fill(~valid, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1) * valid  # all-masked rows -> 0
        pooled = torch.matmul(weights.unsqueeze(-2), h).squeeze(-2)  # [..., D]
        return pooled.to(hidden.dtype)
