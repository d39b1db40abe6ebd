"""A sequence-aware ranker with DIN-style target attention, built from TorchRec parts.

The item-ID table is an ``EmbeddingCollection`` table shared by the target feature
``item_id`` and the history feature ``hist_item_id``; all other sparse features are
pooled by an ``EmbeddingBagCollection``. The ranker touches both collections only by
calling them and through ``embedding_configs()``/``embedding_bag_configs()``, so a
plugin can wrap either one (e.g. put content proxies in the item-ID slots) without
changing this code.
"""

import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor


@torch.fx.wrap
def _pooled_concat(kt: KeyedTensor, keys: List[str]) -> torch.Tensor:
    d = kt.to_dict()
    return torch.cat([d[k] for k in keys], dim=1)


@torch.fx.wrap
def _jagged_to_padded(jt: JaggedTensor, max_len: int) -> torch.Tensor:
    """[sum(L), D] jagged values → [B, max_len, D] zero padded."""
    return torch.ops.fbgemm.jagged_to_padded_dense(
        jt.values(), [jt.offsets()], [max_len], 0.0)


@torch.fx.wrap
def _values_lengths(jt: JaggedTensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return jt.values(), jt.lengths()


@torch.fx.wrap
def _jagged_prefix(values: torch.Tensor, lengths: torch.Tensor, max_len: int
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Jagged rows cut to their first ``max_len`` values (what a ``max_len`` padding
    keeps). values [N, D], lengths [B] -> (values [N', D], segment of each [N'])."""
    lengths = lengths.long()
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device),
                                  lengths, output_size=values.shape[0])
    if values.shape[0] and int(lengths.max()) > max_len:
        offsets = torch.cumsum(lengths, 0) - lengths
        keep = torch.arange(values.shape[0], device=values.device) - offsets[seg] < max_len
        return values[keep], seg[keep]
    return values, seg


@torch.fx.wrap
def _segment_softmax(scores: torch.Tensor, seg: torch.Tensor, num_segments: int
                     ) -> torch.Tensor:
    """Softmax of ``scores`` [N] within each segment (``seg`` [N] in 0..B-1)."""
    shift = torch.full((num_segments,), float("-inf"), dtype=scores.dtype,
                       device=scores.device).scatter_reduce(0, seg, scores.detach(), "amax")
    e = torch.exp(scores - shift[seg])
    total = torch.zeros(num_segments, dtype=e.dtype, device=e.device).index_add(0, seg, e)
    return e / total[seg]


#: ``torchrec-mm evaluate --attention``: score with the learned weights or mean pooling
ATTENTION_WEIGHTS = ("learned", "uniform")


def _plogp(w: torch.Tensor) -> torch.Tensor:
    """``w log w`` elementwise, 0 where ``w`` is 0 (padding, vanished weights)."""
    return torch.where(w > 0, w * w.clamp_min(1e-30).log(), torch.zeros_like(w))


class AttentionProbe:
    """Watches (and optionally replaces) the weights of :class:`TargetAttention`.

    Installed with :func:`probe_attention`. For every sample with at least two history
    items it accumulates the normalised entropy of its weights, ``H(a) / log L`` (1 =
    uniform over the ``L`` attended items, 0 = all weight on one), and the effective
    fraction ``exp(H(a)) / L`` of the history the weights spread over. With
    ``uniform=True`` the learned weights are replaced by ``1 / L`` — the attention
    becomes mean pooling — which measures what the learned weights contribute: score a
    model with and without it (``torchrec-mm evaluate --attention uniform``).
    Statistics are of the learned weights in both cases.
    """

    def __init__(self, uniform: bool = False) -> None:
        self.uniform = uniform
        self.samples = 0
        self._entropy = 0.0
        self._effective = 0.0

    def _record(self, entropy: torch.Tensor, length: torch.Tensor) -> None:
        keep = length >= 2
        if bool(keep.any()):
            h, n = entropy[keep].double(), length[keep].double()
            self.samples += int(keep.sum())
            self._entropy += float((h / n.log()).sum())
            self._effective += float((h.exp() / n).sum())

    def jagged(self, weights: torch.Tensor, seg: torch.Tensor, num_segments: int
               ) -> torch.Tensor:
        """weights [N] of segments ``seg`` [N] -> the weights to use [N]."""
        with torch.no_grad():
            w = weights.detach()
            length = torch.zeros(num_segments, dtype=w.dtype, device=w.device).index_add(
                0, seg, torch.ones_like(w))
            entropy = -torch.zeros(num_segments, dtype=w.dtype, device=w.device).index_add(
                0, seg, _plogp(w))
            self._record(entropy, length)
        if self.uniform:
            return (1.0 / length).index_select(0, seg)
        return weights

    def padded(self, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """weights [B, T] (zero where ``mask`` is False) -> the weights to use."""
        with torch.no_grad():
            w = weights.detach()
            length = mask.sum(1).to(w.dtype)
            self._record(-_plogp(w).sum(1), length)
        if self.uniform:
            return mask.to(weights.dtype) / length.clamp_min(1).unsqueeze(1)
        return weights

    def summary(self) -> Dict[str, float]:
        """``{"samples", "normalized_entropy", "effective_fraction"}`` (means over the
        samples seen; NaN before any)."""
        n = self.samples
        nan = float("nan")
        return {"samples": float(n),
                "normalized_entropy": self._entropy / n if n else nan,
                "effective_fraction": self._effective / n if n else nan}


@contextlib.contextmanager
def probe_attention(model: nn.Module, uniform: bool = False) -> Iterator[AttentionProbe]:
    """Installs one :class:`AttentionProbe` on every :class:`TargetAttention` of
    ``model`` (a plain or DMP-wrapped ranker) for the ``with`` block; raises
    ``ValueError`` when the model has none."""
    modules = [m for m in model.modules() if isinstance(m, TargetAttention)]
    if not modules:
        raise ValueError("the model has no TargetAttention to probe (a target_attention "
                         "ranker has one; DLRM pools its history without attention)")
    probe = AttentionProbe(uniform)
    for m in modules:
        m.probe = probe
    try:
        yield probe
    finally:
        for m in modules:
            m.probe = None


class TargetAttention(nn.Module):
    """DIN activation unit: attention of a target over a sequence.

    Weights ``a_j = MLP([h_j, t, h_j - t, h_j * t])``, masked; the output is
    ``sum_j softmax(a)_j h_j`` (softmax-normalised as in DIN's practice on long
    histories). Empty histories give a zero vector.

    The first layer is evaluated in its expanded form (same parameters, same values)::

        W [h, t, h - t, h * t] + b = (W_h + W_d) h + W_p (h * t) + ((W_t - W_d) t + b)

    so no [.., 4D] input is built and the target's term is computed once per sample,
    not once per history position. :meth:`forward_jagged` runs on the real history
    items only (no padding).

    Args:
        embedding_dim: D.
        hidden: hidden sizes of the attention MLP.
    """

    def __init__(self, embedding_dim: int, hidden: Optional[List[int]] = None,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        hidden = hidden or [64, 32]
        self.embedding_dim = embedding_dim
        #: set by :func:`probe_attention` only (eval-time diagnostics)
        self.probe: Optional[AttentionProbe] = None
        self.mlp = nn.Sequential(
            MLP(4 * embedding_dim, hidden, bias=True, activation="relu", device=device),
            nn.Linear(hidden[-1], 1, device=device),
        )

    def _first_layer(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_h + W_d, W_t - W_d, W_p, b) of the first linear layer [H, D] x3, [H]."""
        linear = self.mlp[0]._mlp[0]._linear
        w_h, w_t, w_d, w_p = linear.weight.split(self.embedding_dim, dim=1)
        return w_h + w_d, w_t - w_d, w_p, linear.bias

    def _scores(self, h: torch.Tensor, h_times_t: torch.Tensor, t_term: torch.Tensor
                ) -> torch.Tensor:
        """Attention logits [...]: h, h*t [..., D], t_term [..., H] (broadcast)."""
        w_seq, _, w_prod, _ = self._first_layer()
        first = self.mlp[0]._mlp[0]
        x = first._activation_fn(torch.nn.functional.linear(h, w_seq)
                                 + torch.nn.functional.linear(h_times_t, w_prod) + t_term)
        for layer in self.mlp[0]._mlp[1:]:
            x = layer(x)
        return self.mlp[1](x).squeeze(-1)

    def _target_term(self, target: torch.Tensor) -> torch.Tensor:
        _, w_target, _, bias = self._first_layer()
        return torch.nn.functional.linear(target, w_target, bias)

    def forward(self, target: torch.Tensor, seq: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
        """
        Args:
            target: [B, D]; seq: [B, T, D]; mask: [B, T] bool (True = real).
        Returns:
            [B, D] attention-pooled history.
        """
        t = target.unsqueeze(1)
        scores = self._scores(seq, seq * t, self._target_term(target).unsqueeze(1))
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=1)
        weights = torch.nan_to_num(weights, nan=0.0)  # rows with no history
        if self.probe is not None:
            weights = self.probe.padded(weights, mask)
        return torch.bmm(weights.unsqueeze(1), seq).squeeze(1)

    def forward_jagged(self, target: torch.Tensor, values: torch.Tensor,
                       lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """The same attention over a jagged history, on its real items only.

        Args:
            target: [B, D]; values: [sum(lengths), D] history rows; lengths: [B];
            max_len: each row's first ``max_len`` items are attended to (as ``forward``
                over the history padded/cut to ``max_len``).
        Returns:
            [B, D]; zero for empty histories.
        """
        h, seg = _jagged_prefix(values, lengths, max_len)
        t = target.index_select(0, seg)
        scores = self._scores(h, h * t, self._target_term(target).index_select(0, seg))
        weights = _segment_softmax(scores, seg, target.shape[0])
        if self.probe is not None:
            weights = self.probe.jagged(weights, seg, target.shape[0])
        return torch.zeros_like(target).index_add(0, seg, weights.unsqueeze(1) * h)


class TargetAttentionRanker(nn.Module):
    """CTR ranker: pooled sparse features + DIN target attention + dense MLP.

    Args:
        embedding_bag_collection: pooled features (user, scenario, attributes, ...).
        embedding_collection: sequence table(s); must produce ``target_feature`` and
            ``history_feature`` with equal embedding dims.
        dense_in_features: number of dense features.
        dense_arch_layer_sizes: dense MLP sizes.
        over_arch_layer_sizes: top MLP sizes (a final linear to 1 logit is appended).
        target_feature / history_feature: KJT keys of the target item and history.
        max_history: T, history positions attended to.

    Call signature is DLRM's: ``forward(dense_features [B, F_d], sparse_features KJT)
    -> logits [B, 1]``.
    """

    def __init__(
        self,
        embedding_bag_collection: nn.Module,
        embedding_collection: nn.Module,
        dense_in_features: int,
        dense_arch_layer_sizes: List[int],
        over_arch_layer_sizes: List[int],
        target_feature: str = "item_id",
        history_feature: str = "hist_item_id",
        max_history: int = 50,
        attention_hidden: Optional[List[int]] = None,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        self.embedding_collection = embedding_collection
        self.target_feature = target_feature
        self.history_feature = history_feature
        self.max_history = max_history
        self._pooled_keys: List[str] = [
            f for c in embedding_bag_collection.embedding_bag_configs() for f in c.feature_names]
        pooled_dim = sum(c.embedding_dim * len(c.feature_names)
                         for c in embedding_bag_collection.embedding_bag_configs())
        seq_dims = {f: c.embedding_dim for c in embedding_collection.embedding_configs()
                    for f in c.feature_names}
        for f in (target_feature, history_feature):
            if f not in seq_dims:
                raise ValueError(f"embedding_collection has no feature '{f}' "
                                 f"(it has {sorted(seq_dims)})")
        if seq_dims[target_feature] != seq_dims[history_feature]:
            raise ValueError("target and history embeddings must have the same dim, got "
                             f"{seq_dims[target_feature]} and {seq_dims[history_feature]}")
        d = seq_dims[target_feature]
        self.attention = TargetAttention(d, attention_hidden, device=device)
        self.dense_arch = MLP(dense_in_features, dense_arch_layer_sizes, bias=True,
                              activation="relu", device=device)
        in_over = pooled_dim + 2 * d + dense_arch_layer_sizes[-1]
        self.over_arch = nn.Sequential(
            MLP(in_over, over_arch_layer_sizes, bias=True, activation="relu", device=device),
            nn.Linear(over_arch_layer_sizes[-1], 1, device=device),
        )

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor
                ) -> torch.Tensor:
        """
        Args:
            dense_features: [B, F_d].
            sparse_features: KJT with the pooled keys, target and history features.
        Returns:
            [B, 1] logits.
        """
        pooled = _pooled_concat(self.embedding_bag_collection(sparse_features),
                                self._pooled_keys)
        seq: Dict[str, JaggedTensor] = self.embedding_collection(sparse_features)
        target_jt = seq[self.target_feature]
        target = _jagged_to_padded(target_jt, 1).squeeze(1)
        values, lengths = _values_lengths(seq[self.history_feature])
        interest = self.attention.forward_jagged(target, values, lengths, self.max_history)
        dense = self.dense_arch(dense_features)
        return self.over_arch(torch.cat([pooled, target, interest, dense], dim=1))
