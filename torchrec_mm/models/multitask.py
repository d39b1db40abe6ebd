"""Multi-task output: a multi-gate mixture of experts over the ranker's top input.

QARM (paper ``002_93e7adf76829e098``, Fig. 3) puts its features under a multi-task
MoE head — one prediction per user action (click, like, ...) — as Kuaishou's rankers
do. :class:`MultiTaskOverArch` is that head (MMoE, Ma et al. 2018): E experts shared by
all tasks, each an MLP of the ranker's over-arch sizes; per task a softmax gate over the
experts and a linear tower to one logit::

    h_e   = expert_e(x)                          [B, H]      e = 1..E
    g_t   = softmax(W_t x)                       [B, E]      t = 1..T
    y_t   = tower_t(sum_e g_t[:, e] * h_e)       [B, 1]

It *replaces* the ``over_arch`` attribute of an unmodified ``torchrec.models.dlrm.DLRM``
/ ``DLRM_DCN`` or of the target-attention ranker (:func:`install_multitask_head`), so
their forward returns ``[B, T]`` logits instead of ``[B, 1]``; the rest of the model
(sparse arch, interaction, sharding) is untouched. Task 0 is the click: every
single-task metric reads column 0.
"""

from typing import List

import torch
from torch import nn
from torchrec.modules.mlp import MLP


class MultiTaskOverArch(nn.Module):
    """MMoE over-arch.

    Args:
        in_features: width of the over-arch input (the ranker's interaction output).
        layer_sizes: each expert's MLP sizes (the ranker's over-arch sizes without the
            final 1).
        num_tasks: T.
        num_experts: E.

    ``forward(x [B, in_features]) -> [B, T]`` logits.
    """

    def __init__(self, in_features: int, layer_sizes: List[int], num_tasks: int,
                 num_experts: int = 4, device: torch.device = None) -> None:
        super().__init__()
        if num_tasks < 1 or num_experts < 1:
            raise ValueError(f"MultiTaskOverArch: need num_tasks >= 1 and num_experts >= 1, "
                             f"got {num_tasks} and {num_experts}")
        if not layer_sizes:
            raise ValueError("MultiTaskOverArch: layer_sizes must not be empty")
        self.num_tasks = num_tasks
        self.experts = nn.ModuleList(
            MLP(in_features, layer_sizes, bias=True, activation="relu", device=device)
            for _ in range(num_experts))
        self.gates = nn.Linear(in_features, num_tasks * num_experts, device=device)
        # per-task towers as one batched weight: [T, H] and [T]
        self.tower_weight = nn.Parameter(torch.empty(num_tasks, layer_sizes[-1], device=device))
        self.tower_bias = nn.Parameter(torch.zeros(num_tasks, device=device))
        nn.init.xavier_uniform_(self.tower_weight)
        self.num_experts = num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.stack([e(x) for e in self.experts], dim=1)                  # [B, E, H]
        g = torch.softmax(self.gates(x).view(-1, self.num_tasks, self.num_experts), dim=2)
        mixed = torch.bmm(g, h)                                                 # [B, T, H]
        return (mixed * self.tower_weight).sum(dim=2) + self.tower_bias        # [B, T]


def _first_linear(module: nn.Module) -> nn.Linear:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return m
    raise ValueError(f"{type(module).__name__} has no linear layer")


def install_multitask_head(ranker: nn.Module, layer_sizes: List[int], num_tasks: int,
                           num_experts: int) -> nn.Module:
    """Replaces ``ranker.over_arch`` (DLRM, DLRM_DCN, the target-attention ranker) by a
    :class:`MultiTaskOverArch` reading the same input; returns the ranker."""
    over = getattr(ranker, "over_arch", None)
    if not isinstance(over, nn.Module):
        raise ValueError(f"{type(ranker).__name__} has no over_arch to put the multi-task "
                         "head in")
    first = _first_linear(over)
    ranker.over_arch = MultiTaskOverArch(first.in_features, layer_sizes, num_tasks,
                                         num_experts, device=first.weight.device)
    return ranker
