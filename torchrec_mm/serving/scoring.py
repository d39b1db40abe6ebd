"""Scoring entry point: a trained ranker (with its plugins) scores candidate items for a
user — new items included, whose proxies / codes come from the online item store.

::

    scorer = RankerScorer.load("runs/v5", store={"idproxy": "out/stores/idproxy"})
    scores = scorer.score(ScoreRequest(user_id=7, history=[31, 4, 90],
                                       candidates=[12, 2999, 3004], timestamp=now))

``load`` rebuilds the run's model from its ``config.json`` and plugin spec (the run's
dataset directory gives the feature layout, user attributes and the training counts
the plugins need), with per-plugin option overrides — typically ``store`` so that the
``idproxy`` / ``qarm`` modules read each request's items from the online store
(``torchrec_mm.serving.store``) rather than from the artefact frozen at training
time. A new item written by ``torchrec-mm serve-items`` is therefore scored with its
content proxy by the next call; an item the store does not have takes the plugin's
documented fallback (its ID embedding / the no-code index). Weights come from the run's
latest checkpoint (safetensors, no unpickling).

The model runs unsharded in this process (inference needs no all-to-all); requests are
scored in one batch (one sample per candidate), vectorised.
"""

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from torchrec_mm.data.batching import Batch, RankingSamples, build_batch


@dataclass
class ScoreRequest:
    """One user and the items to score for them.

    Attributes:
        user_id: dense user id (``[0, num_users)`` of the run's dataset).
        candidates: item ids to score (new items included).
        history: the user's latest positive item ids, latest first (truncated to the
            ranker's history length).
        scenario: scenario index or name (``meta.scenarios``).
        timestamp: request time (unix seconds; gives the hour-of-day features).
        user_attrs: ``{"attr_<name>": value}``; default: the user's values in the dataset.
    """

    user_id: int
    candidates: Sequence[int]
    history: Sequence[int] = ()
    scenario: Union[int, str] = 0
    timestamp: int = 0
    user_attrs: Dict[str, int] = field(default_factory=dict)


class RankerScorer:
    """A trained ranker ready to score requests (see the module docstring).

    Args:
        model: the ``RankerTrain``-wrapped ranker, weights loaded.
        samples: the run's sample index (layout, user attributes, batch transforms).
        scenarios: scenario names of the dataset.
    """

    def __init__(self, model: nn.Module, samples: RankingSamples,
                 scenarios: Optional[List[str]] = None) -> None:
        self.model = model.eval()
        self.samples = samples
        self.layout = samples.layout
        self.scenarios = list(scenarios or [])

    @classmethod
    def load(cls, run: str, data: Optional[str] = None,
             plugin_options: Optional[Dict[str, Dict[str, Any]]] = None,
             store: Optional[Dict[str, str]] = None) -> "RankerScorer":
        """The run's model with its latest checkpoint.

        Args:
            run: a ``torchrec-mm train`` run directory.
            data: dataset directory (default: the one the run was trained on).
            plugin_options: ``{plugin name: {option: value}}`` merged into the run's spec.
            store: shorthand for ``plugin_options={name: {"store": location}}``.
        """
        from torchrec_mm.data.schema import DatasetMeta
        from torchrec_mm.plugins import PluginSpec, load_spec
        from torchrec_mm.training import checkpoint as ckpt
        from torchrec_mm.training.trainer import build_model, load_run_config

        cfg = load_run_config(run, data)
        spec = load_spec(cfg.plugins) if cfg.plugins else PluginSpec()
        overrides = {k: dict(v) for k, v in (plugin_options or {}).items()}
        for name, location in (store or {}).items():
            overrides.setdefault(name, {})["store"] = location
        names = [n for n, _ in spec.plugins]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ValueError(f"{run}: options for plugin(s) {unknown}, but the run's spec "
                             f"({cfg.plugins}) has {names}")
        spec.plugins = [(n, {**o, **overrides.get(n, {})}) for n, o in spec.plugins]
        latest = ckpt.latest_checkpoint(os.path.join(run, "checkpoints"))
        if latest is None:
            raise FileNotFoundError(f"{run}/checkpoints has no checkpoint to score with")
        samples = RankingSamples.from_dataset(cfg.data, cfg.history_length)
        model, _ = build_model(cfg, samples.layout, samples, spec=spec)
        _, skeleton, tensors = ckpt.read_checkpoint(latest)
        state = model.state_dict()
        missing = sorted(k for k in state if f"/model/{k}" not in tensors)
        # frozen inputs a store replaces are not in the model any more; everything else is
        if any(not k.endswith("t_idproxy_inputs.weight") for k in missing):
            raise ValueError(f"{latest}: checkpoint lacks {missing[:5]} — not a checkpoint of "
                             "this run's model")
        model.load_state_dict({k: tensors[f"/model/{k}"] for k in state
                               if f"/model/{k}" in tensors}, strict=False)
        return cls(model, samples, DatasetMeta.load(cfg.data).scenarios)

    # ------------------------------------------------------------------ requests
    def _scenario(self, scenario: Union[int, str]) -> int:
        if isinstance(scenario, str):
            if scenario not in self.scenarios:
                raise ValueError(f"request field 'scenario': unknown scenario '{scenario}' "
                                 f"(known: {self.scenarios})")
            return self.scenarios.index(scenario)
        if not 0 <= int(scenario) < self.layout.num_scenarios:
            raise ValueError(f"request field 'scenario': {scenario} outside "
                             f"0..{self.layout.num_scenarios - 1}")
        return int(scenario)

    def batch(self, request: ScoreRequest) -> Batch:
        """The ranker batch of a request: one sample per candidate."""
        lay = self.layout
        cand = np.asarray(request.candidates, dtype=np.int64).reshape(-1)
        hist = np.asarray(request.history, dtype=np.int64).reshape(-1)[:lay.history_length]
        if cand.size == 0:
            raise ValueError("request field 'candidates': empty")
        for name, ids, high in (("candidates", cand, lay.num_items),
                                ("history", hist, lay.num_items)):
            bad = (ids < 0) | (ids >= high)
            if bad.any():
                raise ValueError(f"request field '{name}': item id {int(ids[bad][0])} outside "
                                 f"the ranker's item table 0..{high - 1}")
        if not 0 <= int(request.user_id) < lay.num_users:
            raise ValueError(f"request field 'user_id': {request.user_id} outside "
                             f"0..{lay.num_users - 1}")
        unknown = sorted(set(request.user_attrs) - set(lay.user_attrs))
        if unknown:
            raise ValueError(f"request field 'user_attrs': unknown attribute(s) {unknown} "
                             f"(known: {sorted(lay.user_attrs)})")
        c = cand.size
        users = np.full(c, int(request.user_id), dtype=np.int64)
        attrs = []
        for k, card in lay.user_attrs.items():
            v = int(request.user_attrs.get(k, self.samples.user_attr_values[k][request.user_id]))
            if not 0 <= v < max(card, 1):
                raise ValueError(f"request field 'user_attrs.{k}': {v} outside 0..{card - 1}")
            attrs.append(np.full(c, v, dtype=np.int64))
        batch = build_batch(
            lay, users, cand, np.full(c, self._scenario(request.scenario), dtype=np.int64),
            np.full(c, int(request.timestamp), dtype=np.int64), attrs,
            np.full(c, hist.size, dtype=np.int64), np.tile(hist, c))
        for transform in self.samples.batch_transforms:
            batch = transform(batch)
        return batch

    @torch.no_grad()
    def score(self, request: ScoreRequest) -> np.ndarray:
        """[C] click probabilities of the candidates ([C, T] for a multi-task ranker,
        click first)."""
        _, (_, logits, _) = self.model(self.batch(request))
        return torch.sigmoid(logits.float()).numpy()
