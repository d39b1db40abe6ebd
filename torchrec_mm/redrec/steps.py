"""``torchrec-mm experiment`` prepare steps of RED-Rec: ``redrec_train``,
``redrec_embed_users`` (user-tower snapshots for the ``redrec_user`` ranker feature, see
:func:`redrec_embed_users_step`) and ``redrec_item_states`` (the stored states of the
jointly trained item tower, see :func:`redrec_item_states_step`).

``redrec_train`` options: any :class:`~torchrec_mm.redrec.train.RedRecConfig` field
except ``data`` and ``out`` (the experiment's data set and ``OUT/prepare/<step name>``);
``progress`` defaults to False. A finished run with the same configuration is not retrained.
Returns ``{"run": out, "steps": ..., "eval": {HR@K, NDCG@K, MRR...}}``, which the
experiment records under ``metrics.json["prepare"][<step name>]``. Several steps with
different options (e.g. ``policy: global_time``) give RED-Rec ablation runs; the
experiment's ranker ablation table does not list them.
"""

import dataclasses
import json
import os
from typing import Any, Dict

from torchrec_mm.experiment import register_step


@register_step("redrec_train")
def redrec_train_step(data: str, out: str, options: Dict[str, Any],
                      train_defaults: Dict[str, Any]) -> Dict[str, Any]:
    from torchrec_mm.redrec.train import RedRecConfig, train_redrec

    opts = dict(options)
    clash = sorted(k for k in ("data", "out") if k in opts)
    if clash:
        raise ValueError(f"experiment step redrec_train: options {clash} are set by the "
                         "experiment")
    opts.setdefault("progress", False)
    cfg = RedRecConfig.from_dict({**opts, "data": data, "out": out},
                                 source="experiment step redrec_train")
    done = os.path.join(out, "train_metrics.json")
    result = None
    if os.path.exists(done):
        with open(done) as f:
            old = json.load(f)
        if old.get("config") == json.loads(json.dumps(cfg.to_dict())):
            result = old
    if result is None:
        result = train_redrec(cfg)
    return {"run": out, "steps": result["steps"], "eval": result.get("eval")}


@register_step("redrec_embed_users")
def redrec_embed_users_step(data: str, out: str, options: Dict[str, Any],
                            train_defaults: Dict[str, Any]) -> Dict[str, Any]:
    """User-tower snapshots of a RED-Rec run for the ``redrec_user`` ranker feature.

    Options: ``run`` (required; e.g. ``"{prepare}/redrec"``, a ``redrec_train`` step's
    directory) and any other :class:`~torchrec_mm.redrec.user_features.EmbedUsersConfig`
    field except ``out`` and ``data`` (set by the experiment: ``OUT/prepare/<step name>``
    and the experiment's data set); ``progress`` defaults to False. Finished snapshots of
    the same run and options are not recomputed (the job is also resumable). Returns
    ``{"embeddings": out, "times", "num_vectors", "config_hash", "checkpoint"}``; variants
    use it as ``{name: redrec_user, options: {embeddings: "{prepare}/<step name>"}}``.
    """
    from torchrec_mm.redrec.user_features import EmbedUsersConfig, embed_users

    opts = dict(options)
    clash = sorted(k for k in ("data", "out") if k in opts)
    if clash:
        raise ValueError(f"experiment step redrec_embed_users: options {clash} are set by "
                         "the experiment")
    if "run" not in opts:
        raise ValueError("experiment step redrec_embed_users: option 'run' (a RED-Rec run "
                         "directory, e.g. \"{prepare}/redrec\") is required")
    opts.setdefault("progress", False)
    try:
        cfg = EmbedUsersConfig(**opts, data=data, out=out)
    except TypeError as e:
        raise ValueError(f"experiment step redrec_embed_users: {e}") from None
    result = embed_users(cfg)
    return {"embeddings": out, **{k: result[k] for k in (
        "times", "num_vectors", "config_hash", "checkpoint")}}


@register_step("redrec_item_states")
def redrec_item_states_step(data: str, out: str, options: Dict[str, Any],
                            train_defaults: Dict[str, Any]) -> Dict[str, Any]:
    """Prepare step: :func:`~torchrec_mm.redrec.item_tower.build_item_states` into
    ``OUT/prepare/<name>`` (train option ``item_states: "{prepare}/<name>"``). Options:
    ``layers`` (default 1), ``batch_size``, ``use_images`` (default true) and
    ContentEncoderConfig fields (``model_path``, ``prompt_template``, ``max_length``,
    ...)."""
    from torchrec_mm.content.encoder import ContentEncoderConfig
    from torchrec_mm.redrec.item_tower import build_item_states

    opts = dict(options)
    layers = int(opts.pop("layers", 1))
    batch_size = int(opts.pop("batch_size", 64))
    use_images = bool(opts.pop("use_images", True))
    fields = {f.name for f in dataclasses.fields(ContentEncoderConfig)}
    bad = sorted(set(opts) - fields)
    if bad:
        raise ValueError(f"experiment step redrec_item_states: unknown option(s) {bad}; "
                         f"options are layers, batch_size, use_images and {sorted(fields)}")
    build_item_states(data, out, layers, ContentEncoderConfig(**opts) if opts else None,
                      batch_size=batch_size, progress=False, use_images=use_images)
    return {"item_states": out}
