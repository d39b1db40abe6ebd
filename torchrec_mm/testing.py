"""Small generated inputs for tests and benchmarks (no dataset on disk needed)."""

from typing import Dict, Optional

import numpy as np

from torchrec_mm.data.batching import FeatureLayout, RankingSamples


def random_samples(
    num_interactions: int = 20000,
    num_users: int = 300,
    num_items: int = 600,
    num_scenarios: int = 3,
    history_length: int = 20,
    seed: int = 0,
    cold_frac: float = 0.1,
    test_frac: float = 0.1,
) -> RankingSamples:
    """A :class:`RankingSamples` with a planted signal: users and items have one of 8
    latent groups; a click is likely when the groups match (so an ID model learns it
    and the target-item/history interaction carries it)."""
    rng = np.random.default_rng(seed)
    user_group = rng.integers(0, 8, num_users)
    item_group = rng.integers(0, 8, num_items)
    u = rng.integers(0, num_users, num_interactions)
    # impressions biased towards the user's group so histories are informative
    same = rng.random(num_interactions) < 0.4
    it = rng.integers(0, num_items, num_interactions)
    by_group = [np.nonzero(item_group == g)[0] for g in range(8)]
    for g in range(8):
        m = same & (user_group[u] == g)
        if len(by_group[g]):
            it[m] = rng.choice(by_group[g], int(m.sum()))
    logit = np.where(user_group[u] == item_group[it], 1.5, -2.0)
    label = (rng.random(num_interactions) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    ts = np.sort(rng.integers(0, 30 * 86400, num_interactions))
    cols: Dict[str, np.ndarray] = {
        "user_id": u, "item_id": it, "scenario": rng.integers(0, num_scenarios, num_interactions),
        "timestamp": ts, "label": label}
    cold_items = rng.random(num_items) < cold_frac
    cut = np.quantile(ts, 1 - test_frac)
    split = np.where(cold_items[it], 2, np.where(ts >= cut, 1, 0)).astype(np.int8)
    layout = FeatureLayout(num_users=num_users, num_items=num_items,
                           num_scenarios=num_scenarios, user_attrs={"attr_group": 8},
                           history_length=history_length)
    return RankingSamples(cols, split, {"attr_group": user_group}, layout)
