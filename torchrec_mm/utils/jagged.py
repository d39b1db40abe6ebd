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
