"""Pooling of jagged rows (per-sample sums and means), fx-traceable as leaves.

Call them as ``jagged.segment_sum(...)`` (module attribute): ``torch.fx.wrap`` patches
this module's namespace while tracing, not a name imported into another module.
"""

import torch


def _sum(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device),
                                  lengths.long(), output_size=values.shape[0])
    return torch.zeros(lengths.numel(), values.shape[1], dtype=values.dtype,
                       device=values.device).index_add(0, seg, values)


@torch.fx.wrap
def segment_sum(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[sum(lengths), d] rows → [B, d] per-segment sums (zero for empty segments)."""
    return _sum(values, lengths)


@torch.fx.wrap
def segment_mean(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[sum(lengths), d] rows → [B, d] per-segment means (zero for empty segments)."""
    return _sum(values, lengths) / lengths.clamp(min=1).unsqueeze(1).to(values.dtype)


class _GatherPool(torch.autograd.Function):
    """Segment pooling of gathered table rows whose backward is itself an embedding-bag
    *forward* over the transposed bags (one bag per table row, holding the segments
    that read it). Same values and gradients as ``embedding_bag``'s own backward, which
    on CPU sorts the indices and accumulates serially (about 2x slower at 2 threads for
    a [2048, 64] batch of 55k lookups)."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor,
                lengths: torch.Tensor, mode: str, weights: "torch.Tensor | None"
                ) -> torch.Tensor:
        ctx.save_for_backward(index, lengths, weights)
        ctx.mode = mode
        ctx.rows = table.shape[0]
        return torch.nn.functional.embedding_bag(index, table, offsets, mode=mode,
                                                 per_sample_weights=weights,
                                                 include_last_offset=True)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        index, lengths, weights = ctx.saved_tensors
        n = index.numel()
        if n == 0:
            return grad.new_zeros(ctx.rows, grad.shape[1]), None, None, None, None, None
        seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=index.device),
                                      lengths, output_size=n)
        w = weights.to(grad.dtype) if weights is not None else None
        if ctx.mode == "mean":
            inv = (1.0 / lengths.clamp(min=1).to(grad.dtype))[seg]
            w = inv if w is None else w * inv
        order = torch.argsort(index, stable=True)
        bag_offsets = torch.zeros(ctx.rows + 1, dtype=torch.long, device=index.device)
        bag_offsets[1:] = torch.cumsum(torch.bincount(index, minlength=ctx.rows), 0)
        g = torch.nn.functional.embedding_bag(
            seg[order], grad.contiguous(), bag_offsets, mode="sum",
            per_sample_weights=None if w is None else w[order], include_last_offset=True)
        return g, None, None, None, None, None


@torch.fx.wrap
def gather_pool(table: torch.Tensor, index: torch.Tensor, lengths: torch.Tensor,
                mode: str = "mean", weights: "torch.Tensor | None" = None) -> torch.Tensor:
    """Per-segment pooling of table rows without materialising the gathered rows.

    Args:
        table: [U, d] rows (may require grad).
        index: [sum(lengths)] row of each jagged value.
        lengths: [B] segment lengths.
        mode: ``mean`` or ``sum`` (``sum`` takes optional per-value ``weights``).

    Returns:
        [B, d]; zero for empty segments. One fused ``embedding_bag``; the gradient into
        ``table`` is another (over the transposed bags, :class:`_GatherPool`), not
        ``embedding_bag``'s sorting backward. Weights that require grad take the plain
        ``embedding_bag`` path.
    """
    lengths = lengths.long()
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long, device=lengths.device)
    offsets[1:] = torch.cumsum(lengths, 0)
    index = index.long()
    if table.requires_grad and torch.is_grad_enabled() and (
            weights is None or not weights.requires_grad):
        return _GatherPool.apply(table, index, offsets, lengths, mode, weights)
    return torch.nn.functional.embedding_bag(index, table, offsets,
                                             mode=mode, per_sample_weights=weights,
                                             include_last_offset=True)
