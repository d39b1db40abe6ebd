"""QARM sparse code features and target-aware code-matching sequences (paper §2.4).

Given the item codes of QARM (``rq`` [N, L] residual-quantised codes, ``vq`` [N, K]
nearest-codebook-item codes, see ``torchrec_mm.qarm.codes``), this module turns the item
ids already in a batch into QARM's sparse features, all as one ``KeyedJaggedTensor``
(:func:`code_feature_kjt`):

* item side: the target's VQ codes and RQ codes (``<prefix>_vq``, ``<prefix>_rq``);
* user side: the codes of the user's latest ``user_len`` history items
  (``<prefix>_hist_vq``, ``<prefix>_hist_rq``);
* target-aware ("the latest first one-code matching item sequence, the latest two-code
  matching item sequence, and so on"): for level ``l = 1..levels`` the latest
  ``match_len`` history items whose first ``l`` RQ codes equal the target's, latest first,
  given by their RQ codes (``<prefix>_match_l<l>``; every matched item contributes exactly
  L values, so ``values.view(-1, L)`` gives one row per item).

RQ codes of all levels live in one table of ``L * (rq_none + 1)`` rows: level ``j``'s code
``c`` is row ``j * (rq_none + 1) + c``. ``rq_none`` (= codebook size) and ``vq_none``
(= N) are the reserved "no code" indices of items without a representation; an item with
the no-code RQ index never matches.

Everything is vectorised torch (no per-sample Python). The data-dependent work lives in
module-level ``torch.fx.wrap`` functions, so a module calling :func:`code_feature_kjt`
(or any function here, through this module's namespace) is ``torch.fx`` / ``torchrec.fx``
traceable; :func:`code_feature_kjt` itself only unpacks the config and is traceable
even when imported by name. :func:`code_matching_reference` is the straightforward
per-sample Python version (tests and the benchmark baseline).

Example::

    cfg = CodeFeatureConfig.from_codes(codes, levels=3, match_len=8, user_len=32)
    qarm_kjt = code_feature_kjt(batch.sparse_features, codes.rq, codes.vq, cfg)
    kjt = KeyedJaggedTensor.concat([batch.sparse_features, qarm_kjt])
"""

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

__all__ = [
    "CodeFeatureConfig",
    "check_code_tables",
    "code_feature_kjt",
    "code_matching_reference",
    "code_matching_sequences",
    "expand_item_codes",
    "latest_items",
    "level_offsets",
]


@dataclass(kw_only=True)
class CodeFeatureConfig:
    """Which QARM features :func:`code_feature_kjt` builds, and from which KJT keys.

    Attributes:
        levels: L' — target-aware sequences for prefix lengths 1..L' (``<= L``; 0: none).
        match_len: n — keep the latest n matching history items per level.
        user_len: codes of the latest ``user_len`` history items as the user-side
            features (0: no user-side features).
        use_vq: build ``<prefix>_vq`` (and ``<prefix>_hist_vq``).
        use_rq: build ``<prefix>_rq`` (and ``<prefix>_hist_rq``).
        item_feature: KJT key of the target item (exactly one id per sample).
        history_feature: KJT key of the history item ids (jagged, latest first).
        prefix: prefix of the output keys.
        vq_none: the reserved "no code" VQ index (= N; the VQ table has N + 1 rows).
        rq_none: the reserved "no code" RQ index (= codebook size; each level has
            ``rq_none + 1`` rows in the RQ table).
        check_tables: check shapes and value ranges of ``rq``/``vq``; the O(N·(L+K)) range
            scan runs once per table tensor (again after an in-place change), see
            :func:`check_code_tables`. Item ids of the batch are always checked.
    """

    levels: int = 6
    match_len: int = 8
    user_len: int = 32
    use_vq: bool = True
    use_rq: bool = True
    item_feature: str = "item_id"
    history_feature: str = "hist_item_id"
    prefix: str = "qarm"
    vq_none: int
    rq_none: int
    check_tables: bool = True

    def __post_init__(self) -> None:
        for name in ("levels", "match_len", "user_len", "vq_none", "rq_none"):
            if getattr(self, name) < 0:
                raise ValueError(f"CodeFeatureConfig.{name} must be >= 0, got "
                                 f"{getattr(self, name)}")
        if self.levels > 0 and self.match_len < 1:
            raise ValueError("CodeFeatureConfig.match_len must be >= 1 when levels > 0, "
                             f"got {self.match_len}")
        if not (self.use_vq or self.use_rq or self.levels):
            raise ValueError("CodeFeatureConfig: no feature selected (use_vq, use_rq "
                             "and levels are all off)")

    @staticmethod
    def from_codes(codes: Any, **kwargs: Any) -> "CodeFeatureConfig":
        """Config with ``vq_none``/``rq_none`` of a ``QARMCodes`` artefact (anything with
        ``vq_vocab`` and ``rq_vocab``: the no-code index is the last of each vocab)."""
        return CodeFeatureConfig(vq_none=int(codes.vq_vocab) - 1,
                                 rq_none=int(codes.rq_vocab) - 1, **kwargs)

    @property
    def vq_table_rows(self) -> int:
        """Rows of the VQ embedding table (N items + the no-code row)."""
        return self.vq_none + 1

    def rq_table_rows(self, num_levels: int) -> int:
        """Rows of the shared RQ embedding table for ``num_levels`` (= L) RQ levels."""
        return num_levels * (self.rq_none + 1)

    def feature_names(self) -> List[str]:
        """The output keys of :func:`code_feature_kjt`, in order."""
        p = self.prefix
        names: List[str] = []
        if self.use_vq:
            names.append(f"{p}_vq")
        if self.use_rq:
            names.append(f"{p}_rq")
        if self.user_len:
            if self.use_rq:
                names.append(f"{p}_hist_rq")
            if self.use_vq:
                names.append(f"{p}_hist_vq")
        names += [f"{p}_match_l{lv}" for lv in range(1, self.levels + 1)]
        return names


# ------------------------------------------------------------------------------ checks


def _check_ids(ids: torch.Tensor, num_rows: int, feature: str,
               lengths: Optional[torch.Tensor] = None) -> None:
    """ValueError naming the feature, the id and its sample if an id is outside
    0..num_rows-1. ``lengths`` ([B]) maps a value position to its sample."""
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)
    if int(lo) >= 0 and int(hi) < num_rows:
        return
    pos = int(torch.nonzero((ids < 0) | (ids >= num_rows))[0, 0])
    sample = pos
    if lengths is not None:
        sample = int(torch.searchsorted(torch.cumsum(lengths.long(), 0),
                                        torch.tensor([pos], device=lengths.device),
                                        right=True)[0])
    raise ValueError(f"qarm: item id {int(ids[pos])} of feature '{feature}' (sample "
                     f"{sample}) is outside the code table's {num_rows} rows "
                     f"(0..{num_rows - 1})")


def _check_lengths(lengths: torch.Tensor, batch: int, num_values: int,
                   feature: str) -> torch.Tensor:
    """int64 copy of ``lengths`` after checking its size, sign and sum."""
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"qarm: feature '{feature}' has {tuple(lengths.shape)} lengths, "
                         f"expected [{batch}] (one per sample)")
    lengths = lengths.long()
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"qarm: feature '{feature}' has a negative length (sample "
                         f"{int(torch.nonzero(lengths < 0)[0, 0])})")
    total = int(lengths.sum())
    if total != num_values:
        raise ValueError(f"qarm: feature '{feature}': lengths sum to {total} but there are "
                         f"{num_values} values")
    return lengths


def _check_levels(levels: int, num_levels: int) -> None:
    if not 1 <= levels <= num_levels:
        raise ValueError(f"qarm: levels = {levels} but the RQ codes have {num_levels} "
                         f"levels (expected 1..{num_levels})")


def check_code_tables(rq: torch.Tensor, vq: Optional[torch.Tensor],
                      cfg: CodeFeatureConfig, cached: bool = False) -> None:
    """Checks shapes and value ranges of the code tables against ``cfg``.

    Args:
        rq: [N, L] int RQ codes in 0..rq_none.
        vq: [N, K] int VQ codes (item ids) in 0..vq_none, or None when ``cfg.use_vq`` is off.
        cached: skip the O(N·(L+K)) range check of a table that already passed, as long
            as it is the same tensor object and was not modified in place since.

    Raises:
        ValueError naming the table, the item and the level/column of a bad code.
    """
    if rq.dim() != 2 or rq.dtype.is_floating_point:
        raise ValueError(f"qarm: rq must be an integer [N, L] tensor, got {rq.dtype} "
                         f"{tuple(rq.shape)}")
    tables = [("rq", rq, cfg.rq_none)]
    if vq is not None:
        if vq.dim() != 2 or vq.dtype.is_floating_point:
            raise ValueError(f"qarm: vq must be an integer [N, K] tensor, got {vq.dtype} "
                             f"{tuple(vq.shape)}")
        if vq.shape[0] != rq.shape[0]:
            raise ValueError(f"qarm: vq has {vq.shape[0]} rows but rq has {rq.shape[0]} "
                             "(one row per item in both)")
        tables.append(("vq", vq, cfg.vq_none))
    elif cfg.use_vq:
        raise ValueError("qarm: use_vq is on but no vq table was given")
    for name, t, none in tables:
        if cached:
            _derived(t, ("checked", none), lambda t: _check_range(name, t, none))
        else:
            _check_range(name, t, none)


def _check_range(name: str, t: torch.Tensor, none: int) -> torch.Tensor:
    """Raises unless every code of ``t`` is in 0..none; returns an empty tensor."""
    if t.numel() == 0:
        return t.new_empty(0)
    lo, hi = torch.aminmax(t)
    if int(lo) < 0 or int(hi) > none:
        item, col = (int(x) for x in torch.nonzero((t < 0) | (t > none))[0])
        raise ValueError(f"qarm: {name} code {int(t[item, col])} of item {item} "
                         f"(column {col}) is outside 0..{none} ({name}_none = {none})")
    return t.new_empty(0)


# (id of a code table, what) -> (weak reference to the table, its version, derived tensor)
_DERIVED: Dict[Tuple[int, Any], Tuple[Any, int, torch.Tensor]] = {}


def _derived(table: torch.Tensor, what: Any, make: Callable[[torch.Tensor], torch.Tensor]
             ) -> torch.Tensor:
    """``make(table)``, cached while ``table`` is the same, unmodified tensor object
    (``Tensor._version`` counts in-place writes). Code tables are fixed for a run, so
    their derived layouts are built once instead of per batch."""
    if table.is_inference():  # no version counter: cannot tell in-place writes
        return make(table)
    hit = _DERIVED.get((id(table), what))
    if hit is not None and hit[0]() is table and hit[1] == table._version:
        return hit[2]
    out = make(table)
    for key in [k for k, v in _DERIVED.items() if v[0]() is None]:
        del _DERIVED[key]
    _DERIVED[(id(table), what)] = (weakref.ref(table), table._version, out)
    return out


def _columns(rq: torch.Tensor) -> torch.Tensor:
    """[L, N] level-major contiguous copy of ``rq`` in the narrowest of int16/int32 that
    holds the codes: the matching gathers one level for many positions, ~3x faster from
    a contiguous narrow column than from a strided int64 one."""
    cols = rq.t().contiguous()
    if cols.numel():
        lo, hi = (int(x) for x in torch.aminmax(cols))
        for dtype in (torch.int16, torch.int32):
            if lo >= torch.iinfo(dtype).min and hi <= torch.iinfo(dtype).max:
                return cols.to(dtype)
    return cols


def _code_columns(rq: torch.Tensor) -> torch.Tensor:
    """Cached :func:`_columns` (at most N·L·4 extra bytes while ``rq`` lives)."""
    return _derived(rq, "columns", _columns)


def _offset_codes(rq: torch.Tensor, rq_none: int) -> torch.Tensor:
    """Cached [N, L] int64 ``rq + level_offsets(L, rq_none)`` (rows of the shared RQ
    table), so that emitting RQ features is a plain row gather."""
    return _derived(rq, ("offset", rq_none), lambda t: t.long() + level_offsets(
        t.shape[1], rq_none, t.device))


# ------------------------------------------------------------------- jagged transforms


def _latest(hist_values: torch.Tensor, lengths: torch.Tensor,
            n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`latest_items` without checks; ``lengths`` int64."""
    out = lengths.clamp(max=n)
    U = int(out.sum())
    if U == hist_values.shape[0]:
        return hist_values, out
    # kept position u of row b = u + (row start in the input - row start in the output)
    shift = (torch.cumsum(lengths, 0) - lengths) - (torch.cumsum(out, 0) - out)
    idx = torch.arange(U, device=hist_values.device) + torch.repeat_interleave(
        shift, out, output_size=U)
    return hist_values.index_select(0, idx), out


@torch.fx.wrap
def latest_items(hist_values: torch.Tensor, hist_lengths: torch.Tensor,
                 n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Truncates each jagged row to its first ``n`` (= latest ``n``) items.

    Args:
        hist_values: [T] item ids, rows concatenated, latest first within a row.
        hist_lengths: [B] row lengths.
        n: items kept per row (>= 0).

    Returns:
        values [sum(min(len, n))], lengths [B] (dtype of ``hist_lengths``).
    """
    if n < 0:
        raise ValueError(f"qarm: latest_items needs n >= 0, got {n}")
    lengths = _check_lengths(hist_lengths, hist_lengths.shape[0], hist_values.shape[0],
                             "history")
    values, out = _latest(hist_values, lengths, n)
    return values, out.to(hist_lengths.dtype)


def _expand(item_values: torch.Tensor, item_lengths: torch.Tensor, codes: torch.Tensor,
            offsets: Optional[torch.Tensor], out: Optional[torch.Tensor] = None
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`expand_item_codes` without checks; writes into ``out`` ([T * C]) if given."""
    C = codes.shape[1]
    if out is None:
        c = codes.index_select(0, item_values)
    elif out.dtype == codes.dtype:
        c = torch.index_select(codes, 0, item_values, out=out.view(-1, C))
    else:
        c = out.view(-1, C)
        c.copy_(codes.index_select(0, item_values))
    if offsets is not None:
        c += offsets
    return c.reshape(-1), item_lengths * C


@torch.fx.wrap
def expand_item_codes(item_values: torch.Tensor, item_lengths: torch.Tensor,
                      codes: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                      feature: str = "items") -> Tuple[torch.Tensor, torch.Tensor]:
    """Replaces every item of a jagged row by its C codes.

    Args:
        item_values: [T] item ids (rows of ``codes``).
        item_lengths: [R] row lengths (sum T).
        codes: [N, C] int codes per item.
        offsets: optional [C] added to code column c (e.g. :func:`level_offsets` to put
            the L RQ levels in one table).
        feature: name used in error messages.

    Returns:
        values [T * C] (item 0's C codes, item 1's, ...), lengths [R] = item_lengths * C.
    """
    _check_ids(item_values, codes.shape[0], feature, item_lengths)
    C = codes.shape[1]
    if offsets is not None and offsets.shape != (C,):
        raise ValueError(f"qarm: offsets has shape {tuple(offsets.shape)}, expected "
                         f"[{C}] (one per code column)")
    return _expand(item_values, item_lengths, codes, offsets)


def level_offsets(num_levels: int, rq_none: int,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """[L] int64 offsets ``l * (rq_none + 1)`` that put L RQ levels into one table."""
    return torch.arange(num_levels, dtype=torch.int64, device=device) * (rq_none + 1)


def _matching(target: torch.Tensor, hist_values: torch.Tensor, lengths: torch.Tensor,
              rq: torch.Tensor, levels: int, max_len: int, none_code: Optional[int]
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`code_matching_sequences` without checks; ``lengths`` int64.

    Level by level, only the history positions still matching are compared (level l+1
    candidates are level l's matches), so the cost is O(T + matches), not O(T * L').
    """
    B = target.shape[0]
    T = hist_values.shape[0]
    cols = _code_columns(rq)                                   # [L, N], cached

    def target_codes(lv: int, ids: torch.Tensor) -> torch.Tensor:
        # a no-code target gets -1, which no history code equals: "no code" never
        # matches, without masking the history codes
        c = cols[lv].index_select(0, ids)
        return c if none_code is None else c.masked_fill_(c == none_code, -1)

    # level 1 over all T positions; the target's code repeated over its row
    row = torch.repeat_interleave(torch.arange(B, dtype=torch.int32, device=target.device),
                                  lengths, output_size=T)       # [T] sample of a position
    ok = cols[0].index_select(0, hist_values) == target_codes(0, target).index_select(0, row)
    pos = torch.nonzero(ok).squeeze(1)                         # candidates, ascending
    seg = row.index_select(0, pos).long()                      # their samples
    items = hist_values.index_select(0, pos)
    tgt = target.index_select(0, seg)
    level_items = [items]
    level_rows = [seg]
    for lv in range(1, levels):
        ok = cols[lv].index_select(0, items) == target_codes(lv, tgt)
        sel = torch.nonzero(ok).squeeze(1)
        items, seg = items.index_select(0, sel), seg.index_select(0, sel)
        tgt = tgt.index_select(0, sel)
        level_items.append(items)
        level_rows.append(seg + lv * B)                        # KJT row: level-major
    all_items = torch.cat(level_items)
    rows = torch.cat(level_rows)                               # non-decreasing
    counts = torch.bincount(rows, minlength=levels * B)        # [L' * B]
    out_lengths = counts.clamp(max=max_len)
    if bool((counts == out_lengths).all()):
        return all_items, out_lengths
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(rows.shape[0], device=rows.device) - starts.index_select(0, rows)
    return all_items[rank < max_len], out_lengths


@torch.fx.wrap
def code_matching_sequences(target: torch.Tensor, hist_values: torch.Tensor,
                            hist_lengths: torch.Tensor, rq: torch.Tensor, levels: int,
                            max_len: int, none_code: Optional[int] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """QARM target-aware code-matching sequences (paper §2.4), for a whole batch at once.

    For level ``l`` (1..levels) and sample ``b``: the latest ``<= max_len`` history items
    of ``b`` whose first ``l`` RQ codes equal the target's first ``l``, latest first.
    Items whose codes up to level ``l`` include ``none_code`` never match at level
    ``l`` (so items without a code never match).

    Args:
        target: [B] target item ids.
        hist_values: [T] history item ids, rows concatenated, latest first per row.
        hist_lengths: [B] history lengths (sum T).
        rq: [N, L] RQ codes of the items (>= 0).
        levels: L' in 1..L, the prefix lengths produced.
        max_len: keep the latest ``max_len`` matches per level and sample (>= 0).
        none_code: the reserved "no code" index (``rq_none``), or None.

    Returns:
        values [S] matched item ids, lengths [levels * B] in KJT key-major layout (level
        1's B rows, then level 2's, ...); lengths have the dtype of ``hist_lengths``.
    """
    N, L = rq.shape
    _check_levels(levels, L)
    if max_len < 0:
        raise ValueError(f"qarm: max_len must be >= 0, got {max_len}")
    lengths = _check_lengths(hist_lengths, target.shape[0], hist_values.shape[0], "history")
    _check_ids(target, N, "target")
    _check_ids(hist_values, N, "history", lengths)
    values, out = _matching(target, hist_values, lengths, rq, levels, max_len, none_code)
    return values, out.to(hist_lengths.dtype)


def code_matching_reference(target: torch.Tensor, hist_values: torch.Tensor,
                            hist_lengths: torch.Tensor, rq: torch.Tensor, levels: int,
                            max_len: int, none_code: Optional[int] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Straightforward per-sample Python version of :func:`code_matching_sequences`
    (same arguments and output), for tests and as the benchmark baseline."""
    if not 1 <= levels <= rq.shape[1]:
        raise ValueError(f"qarm: levels = {levels} but the RQ codes have {rq.shape[1]} levels")
    hist = hist_values.tolist()
    hist_codes = rq[hist_values].tolist()  # the rows needed only: cost grows with the batch
    rows: List[List[List[int]]] = [[] for _ in range(levels)]
    start = 0
    for tc, n in zip(rq[target].tolist(), hist_lengths.tolist()):
        per_level: List[List[int]] = [[] for _ in range(levels)]
        for item, ic in zip(hist[start:start + n], hist_codes[start:start + n]):
            for lv in range(levels):
                if ic[lv] != tc[lv] or ic[lv] == none_code:
                    break
                if len(per_level[lv]) < max_len:
                    per_level[lv].append(item)
        for lv in range(levels):
            rows[lv].append(per_level[lv])
        start += n
    flat = [item for level_rows in rows for row in level_rows for item in row]
    lens = [len(row) for level_rows in rows for row in level_rows]
    return (torch.tensor(flat, dtype=hist_values.dtype),
            torch.tensor(lens, dtype=hist_lengths.dtype))


# ----------------------------------------------------------------------- the QARM KJT


@torch.fx.wrap
def _code_features(kjt: KeyedJaggedTensor, rq: torch.Tensor, vq: Optional[torch.Tensor],
                   levels: int, match_len: int, user_len: int, use_vq: bool, use_rq: bool,
                   item_feature: str, history_feature: str, prefix: str, vq_none: int,
                   rq_none: int, check_tables: bool) -> KeyedJaggedTensor:
    cfg = CodeFeatureConfig(levels=levels, match_len=match_len, user_len=user_len,
                            use_vq=use_vq, use_rq=use_rq, item_feature=item_feature,
                            history_feature=history_feature, prefix=prefix,
                            vq_none=vq_none, rq_none=rq_none, check_tables=check_tables)
    if check_tables:
        check_code_tables(rq, vq if use_vq else None, cfg, cached=True)
    keys = kjt.keys()
    for key in [item_feature] + ([history_feature] if user_len or levels else []):
        if key not in keys:
            raise ValueError(f"qarm: the batch has no feature '{key}' (keys: {keys})")
    B = kjt.stride()
    N, L = rq.shape
    if levels > L:
        _check_levels(levels, L)
    item = kjt[item_feature]
    target, t_lengths = item.values(), item.lengths()
    if t_lengths.numel() and bool((t_lengths != 1).any()):
        bad = int(torch.nonzero(t_lengths != 1)[0, 0])
        raise ValueError(f"qarm: feature '{item_feature}' must hold exactly one item id per "
                         f"sample; sample {bad} has {int(t_lengths[bad])}")
    _check_ids(target, N, item_feature)
    ldtype = kjt.lengths().dtype
    device = target.device
    rq_rows = _offset_codes(rq, rq_none) if (use_rq or levels) else rq  # RQ table rows
    # (ids, codes table, lengths of the ids) per output key, in key order
    parts: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    ones = torch.ones(B, dtype=ldtype, device=device)
    if use_vq:
        assert vq is not None
        parts.append((target, vq, ones))
    if use_rq:
        parts.append((target, rq_rows, ones))
    if user_len or levels:
        hist = kjt[history_feature]
        h_values = hist.values()
        h_lengths = _check_lengths(hist.lengths(), B, h_values.shape[0], history_feature)
        _check_ids(h_values, N, history_feature, h_lengths)
        if user_len:
            u_values, u_lengths = _latest(h_values, h_lengths, user_len)
            if use_rq:
                parts.append((u_values, rq_rows, u_lengths))
            if use_vq:
                assert vq is not None
                parts.append((u_values, vq, u_lengths))
        if levels:
            m_values, m_lengths = _matching(target, h_values, h_lengths, rq, levels,
                                            match_len, rq_none)
            parts.append((m_values, rq_rows, m_lengths))
    # gather every key's codes straight into one preallocated values buffer (no cat copy)
    sizes = [ids.shape[0] * codes.shape[1] for ids, codes, _ in parts]
    values = torch.empty(sum(sizes), dtype=torch.int64, device=device)
    lengths: List[torch.Tensor] = []
    start = 0
    for (ids, codes, n), size in zip(parts, sizes):
        _, out_lengths = _expand(ids, n, codes, None, values[start:start + size])
        lengths.append(out_lengths.to(ldtype))
        start += size
    return KeyedJaggedTensor(keys=cfg.feature_names(), values=values,
                             lengths=torch.cat(lengths), stride=B)


def code_feature_kjt(kjt: KeyedJaggedTensor, rq: torch.Tensor, vq: Optional[torch.Tensor],
                     cfg: CodeFeatureConfig) -> KeyedJaggedTensor:
    """QARM's sparse features from the item ids of a batch, as a new KJT (stride B).

    Keys (``cfg.feature_names()``; ``p`` = ``cfg.prefix``), each row of sample b:

    * ``p_vq``: the target's K VQ codes (rows of a table of ``cfg.vq_table_rows``);
    * ``p_rq``: the target's L RQ codes, level ``j`` offset by ``j * (rq_none + 1)``
      (one table of ``cfg.rq_table_rows(L)`` rows);
    * ``p_hist_rq`` / ``p_hist_vq``: the codes of the latest ``user_len`` history items,
      item by item (RQ offset as above);
    * ``p_match_l<l>``, l = 1..levels: the latest ``match_len`` history items sharing the
      target's first l RQ codes (:func:`code_matching_sequences`), each as its L offset
      RQ codes.

    Args:
        kjt: the batch's KJT with ``cfg.item_feature`` (one id per sample) and
            ``cfg.history_feature`` (jagged, latest first).
        rq: [N, L] int64 RQ codes (0..rq_none).
        vq: [N, K] int64 VQ codes (0..vq_none), or None when ``cfg.use_vq`` is off.
        cfg: the features to build.

    Returns:
        KJT with keys ``cfg.feature_names()``, int64 values, lengths of ``kjt``'s dtype.
        Append it to the batch's KJT with ``KeyedJaggedTensor.concat``.

    Raises:
        ValueError: an item id outside rq's rows (naming the feature, id and sample),
            ``cfg.levels > L``, a missing feature, bad code tables.
    """
    return _code_features(kjt, rq, vq, cfg.levels, cfg.match_len, cfg.user_len, cfg.use_vq,
                          cfg.use_rq, cfg.item_feature, cfg.history_feature, cfg.prefix,
                          cfg.vq_none, cfg.rq_none, cfg.check_tables)
