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
        [B, d]; zero for empty segments. One fused ``embedding_bag``, gradient into
        ``table`` included.
    """
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long, device=lengths.device)
    offsets[1:] = torch.cumsum(lengths.long(), 0)
    return torch.nn.functional.embedding_bag(index.long(), table, offsets,
                                             mode=mode, per_sample_weights=weights,
                                             include_last_offset=True)
