import os
import re

import numpy as np
import pytest

from torchrec_mm.data.io import load_interaction_columns, load_items, load_meta, load_users
from torchrec_mm.data.synth import (
    MAX_TOPICS,
    TOPICS,
    TRUTH_FILE,
    SynthConfig,
    SynthTruth,
    affinity,
    generate,
)

CFG = SynthConfig(num_users=400, num_items=600, num_interactions=40_000, num_topics=12, seed=7)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "ds")
    generate(CFG, out)
    return out, SynthTruth.load(out), load_interaction_columns(out)


def _files(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)


def test_reproducible(synth, tmp_path):
    out, _, _ = synth
    again = str(tmp_path / "again")
    generate(CFG, again)
    assert _files(out) == _files(again)
    for f in _files(out):
        with open(os.path.join(out, f), "rb") as a, open(os.path.join(again, f), "rb") as b:
            assert a.read() == b.read(), f
    other = str(tmp_path / "other")
    generate(SynthConfig(**{**CFG.__dict__, "seed": 8}), other)
    assert not np.array_equal(load_interaction_columns(other)["item_id"],
                              load_interaction_columns(out)["item_id"])


def test_shapes_shares_ctr_and_time(synth):
    out, truth, c = synth
    meta = load_meta(out)
    assert (meta.num_users, meta.num_items, meta.num_interactions) == (400, 600, 40_000)
    assert meta.scenarios == ["homefeed", "search", "ads"]
    assert meta.actions == ["is_click", "is_like", "is_share", "is_collect"]
    assert meta.user_attrs == {"attr_age_group": 5, "attr_region": 6}
    assert os.path.exists(os.path.join(out, TRUTH_FILE))
    assert truth.item_topic_mix.shape == (600, 12) and truth.user_interest.shape == (400, 12)
    np.testing.assert_allclose(truth.item_topic_mix.sum(1), 1, atol=1e-6)
    assert truth.topic_names == [t for t, _ in TOPICS[:12]]

    shares = np.bincount(c["scenario"], minlength=3) / len(c["scenario"])
    np.testing.assert_allclose(shares, [0.75, 0.15, 0.10], atol=0.04)
    assert 0.17 < c["label"].mean() < 0.23
    # click bit == label; other actions only with a click
    assert ((c["actions"] & 1) == c["label"]).all()
    assert ((c["actions"] > 1) <= (c["label"] == 1)).all()
    assert c["duration"][c["label"] == 1].mean() > 3 * c["duration"][c["label"] == 0].mean()
    # per-user increasing time over ~60 days, with an evening peak
    key = c["user_id"] * 10**11 + c["timestamp"]
    assert (np.diff(key) >= 0).all()
    span = (c["timestamp"].max() - c["timestamp"].min()) / 86400
    assert 58 < span <= 60
    hour = (c["timestamp"] % 86400) // 3600
    per_hour = np.bincount(hour, minlength=24)
    assert per_hour[19:23].mean() > 3 * per_hour[2:6].mean()
    # log-normal activity: heavy-tailed user counts
    counts = np.bincount(c["user_id"], minlength=400)
    assert counts.min() >= CFG.min_user_interactions and counts.max() > 4 * np.median(counts)


def test_clicks_follow_planted_affinity(synth):
    _, truth, c = synth
    aff = affinity(truth, c["user_id"], c["item_id"])
    q = np.quantile(aff, [0.25, 0.75])
    low, high = c["label"][aff <= q[0]].mean(), c["label"][aff >= q[1]].mean()
    assert high > 2.5 * low
    # given a click, likes rise with the engagement (affinity + active intent)
    u, i = c["user_id"], c["item_id"]
    intent = np.where(c["timestamp"] >= truth.user_intent_start[u],
                      truth.item_topic_mix[i, truth.user_intent_topic[u]], 0.0)
    engage = np.clip(aff + intent, 0, 1)
    clicked = c["label"] == 1
    liked = ((c["actions"] >> 1) & 1)[clicked]
    e = engage[clicked]
    qe = np.quantile(e, [0.25, 0.75])
    assert liked[e >= qe[1]].mean() > liked[e <= qe[0]].mean() + 0.15


def _intent_masks(truth, c):
    """[N] bool: the impression's item is in the user's intent topic; the intent had
    started at the impression's time."""
    u = c["user_id"]
    return (truth.item_topic[c["item_id"]] == truth.user_intent_topic[u],
            c["timestamp"] >= truth.user_intent_start[u])


def test_cross_scenario_intent(synth):
    _, truth, c = synth
    intent_item, started = _intent_masks(truth, c)
    assert (truth.user_intent_topic != truth.user_interest.argmax(1)).all()
    sparse, home = started & (c["scenario"] > 0), started & (c["scenario"] == 0)
    # search/ads reveal the intent far more than homefeed ...
    assert intent_item[sparse].mean() > 3 * intent_item[home].mean()
    # ... and it drives homefeed clicks
    assert c["label"][home & intent_item].mean() > 1.5 * c["label"][home & ~intent_item].mean()


def test_intent_shares_set_where_the_intent_shows(tmp_path):
    """intent_share_homefeed 0: homefeed impressions hit the intent topic only by chance
    (popular items, interest topics), about as often as before the intent started;
    search/ads keep it."""
    cfg = SynthConfig(num_users=300, num_items=600, num_interactions=30_000,
                      num_topics=12, seed=3, intent_share_homefeed=0.0)
    out = str(tmp_path / "ds")
    generate(cfg, out)
    c = load_interaction_columns(out)
    intent_item, started = _intent_masks(SynthTruth.load(out), c)
    home = c["scenario"] == 0
    chance = intent_item[home & ~started].mean()
    assert intent_item[home & started].mean() < 1.5 * chance
    assert intent_item[~home & started].mean() > 0.5
    with pytest.raises(ValueError, match="intent_share_homefeed"):
        generate(SynthConfig(intent_share_homefeed=1.2), str(tmp_path / "x"))


def test_popularity_off_flattens_item_counts(tmp_path):
    """zipf_exponent 0, pop_share 0, quality_std 0: no item is favoured beyond its
    topic — the most shown 1% of items take far less of the impressions than with the
    default Zipf popularity; out-of-range values are refused by name."""
    def top_share(cfg, name):
        out = str(tmp_path / name)
        generate(cfg, out)
        counts = np.sort(np.bincount(load_interaction_columns(out)["item_id"],
                                     minlength=cfg.num_items))[::-1]
        return counts[:cfg.num_items // 100].sum() / counts.sum()

    kw = dict(num_users=300, num_items=1000, num_interactions=30_000, num_topics=8, seed=1)
    skewed = top_share(SynthConfig(**kw), "skewed")
    flat = top_share(SynthConfig(zipf_exponent=0.0, pop_share=(0.0, 0.0, 0.0),
                                 quality_std=0.0, **kw), "flat")
    assert flat < 0.08 < 0.2 < skewed, (flat, skewed)  # seen: 0.046 and 0.30
    for bad, match in ((dict(zipf_exponent=-0.5), "zipf_exponent"),
                       (dict(quality_std=float("nan")), "quality_std"),
                       (dict(pop_share=(0.1, 1.2, 0.0)), "pop_share")):
        with pytest.raises(ValueError, match=match):
            generate(SynthConfig(**bad), str(tmp_path / "bad"))


def _topic_hits(text, patterns):
    return np.array([len(p.findall(text)) for p in patterns])


def test_text_reveals_topics(synth):
    out, truth, _ = synth
    texts = load_items(out).column("text").to_pylist()
    patterns = [re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b",
                           re.IGNORECASE) for _, words in TOPICS[:12]]
    hits = np.stack([_topic_hits(t, patterns) for t in texts])
    # the dominant topic is the topic with the most vocabulary hits
    assert (hits.argmax(1) == truth.item_topic).mean() > 0.95
    # items of the same topic share topic words, items of different topics hardly do
    words = [set(w.lower() for p in patterns for w in p.findall(t)) for t in texts]
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 600, 3000), rng.integers(0, 600, 3000)
    keep = a != b
    jac = np.array([len(words[i] & words[j]) / max(len(words[i] | words[j]), 1)
                    for i, j in zip(a[keep], b[keep])])
    same = truth.item_topic[a[keep]] == truth.item_topic[b[keep]]
    assert jac[same].mean() > 5 * jac[~same].mean()
    # a realistic spread of lengths
    n_words = np.array([len(t.split()) for t in texts])
    assert n_words.min() <= 8 and np.percentile(n_words, 90) >= 40 and n_words.max() >= 100


def test_vocabularies_are_real_and_disjoint():
    assert len(TOPICS) == MAX_TOPICS >= 16
    phrases = [w.lower() for _, ws in TOPICS for w in ws]
    assert len(phrases) == len(set(phrases))
    for name, ws in TOPICS:
        assert len(ws) >= 25, name
        assert all(re.fullmatch(r"[A-Za-z][A-Za-z \-]*", w) for w in ws), name


def test_user_attributes_predict_interests(synth):
    out, truth, _ = synth
    users = load_users(out)
    age = users.column("attr_age_group").to_numpy()
    np.testing.assert_array_equal(age, truth.user_age_group)
    top = truth.user_interest.argmax(1)

    def mutual_info(x, y):
        joint = np.histogram2d(x, y, bins=[np.arange(x.max() + 2), np.arange(13)])[0] / len(x)
        px, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
        nz = joint > 0
        return (joint[nz] * np.log(joint[nz] / (px @ py)[nz])).sum()

    rng = np.random.default_rng(0)
    observed = mutual_info(age, top)
    null = [mutual_info(rng.permutation(age), top) for _ in range(50)]
    assert observed > max(null)


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="num_topics"):
        generate(SynthConfig(num_topics=MAX_TOPICS + 1), str(tmp_path / "x"))
    with pytest.raises(ValueError, match="num_items"):
        generate(SynthConfig(num_items=3, num_topics=8), str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")
