"""Training and evaluation of rankers under ``DistributedModelParallel``.

One code path for every world size: the ranker (plus plugins) is built on CPU from a
seed, wrapped in :class:`RankerTrain`, sharded by DMP under a plan from
``EmbeddingShardingPlanner`` and initialised from the unsharded weights, so the same
seed gives the same model whatever the plan. Embedding tables use TorchRec's fused
optimizer (``apply_optimizer_in_backward``), dense parameters a ``KeyedOptimizer``.

Gradients are global-batch means everywhere: DDP averages the dense ones and the
backward all-to-all of sharded tables divides by the world size (TorchRec's
``GRADIENT_DIVISION``), so ``world_size`` ranks at per-rank batch B take the same steps
as one process at batch ``world_size * B`` (integration_tests/test_sharded_parity.py).
Data-parallel tables get the embedding optimizer too (not the dense one).
"""

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from torchrec_mm.data.batching import (
    FeatureLayout,
    RankingBatchDataset,
    RankingSamples,
)
from torchrec_mm.models.rankers import (
    RankerConfig,
    RankerTrain,
    build_collections,
    build_ranker,
    table_configs,
)
from torchrec_mm.training import checkpoint as ckpt
from torchrec_mm.training.evaluate import evaluate_model
from torchrec_mm.training.distributed import (
    DistContext,
    init_distributed,
    launched_by_torchrun,
    spawn,
)
from torchrec_mm.training.sharding import SHARDING_TYPES, default_sharders, make_plan
from torchrec_mm.utils.io import write_json

logger = logging.getLogger(__name__)

EMBEDDING_OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "adam": torch.optim.Adam,
}


@dataclass
class TrainConfig:
    """Everything a ranker training run needs (``torchrec-mm train`` flags).

    Attributes:
        data: dataset directory (with ``split.json``).
        out: run directory: checkpoints, ``train_metrics.json``.
        ranker: the ranker config.
        plugins: optional plugin spec (YAML path) applied to the ranker.
        batch_size: per-rank batch size.
        world_size: number of ranks (spawned here unless launched by torchrun).
        sharding_type: planner constraint for every table (``auto``: planner's choice).
        checkpoint_every: steps between checkpoints (0: only at the end of epochs).
        max_steps: stop after this many steps (None: ``epochs`` full epochs).
        pipeline: train through ``TrainPipelineSparseDist`` (input dist of batch i+1
            overlapped with step i).
    """

    data: str
    out: str
    ranker: RankerConfig = field(default_factory=RankerConfig)
    plugins: Optional[str] = None
    history_length: int = 50
    batch_size: int = 512
    eval_batch_size: int = 2048
    epochs: int = 1
    max_steps: Optional[int] = None
    dense_optimizer: str = "adam"
    dense_lr: float = 5e-3
    embedding_optimizer: str = "adagrad"
    embedding_lr: float = 0.05
    world_size: int = 1
    sharding_type: str = "auto"
    seed: int = 0
    num_workers: int = 0
    checkpoint_every: int = 0
    log_every: int = 10
    evaluate: bool = True
    resume: bool = True
    progress: bool = True
    pipeline: bool = False

    def __post_init__(self) -> None:
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise ValueError(f"unknown embedding optimizer '{self.embedding_optimizer}', "
                             f"expected one of {sorted(EMBEDDING_OPTIMIZERS)}")
        if self.dense_optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown dense optimizer '{self.dense_optimizer}' (adam, sgd)")
        if self.sharding_type not in SHARDING_TYPES:
            raise ValueError(f"unknown sharding type '{self.sharding_type}', expected one "
                             f"of {SHARDING_TYPES}")
        for name in ("batch_size", "eval_batch_size", "epochs", "world_size",
                     "history_length", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- build


def embedding_parameters(module: nn.Module) -> List[nn.Parameter]:
    """Trainable parameters of every EBC/EC inside ``module``."""
    params = []
    for m in module.modules():
        if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection)):
            params.extend(p for p in m.parameters() if p.requires_grad)
    return params


def build_model(cfg: TrainConfig, layout: FeatureLayout,
                samples: Optional[RankingSamples] = None,
                spec: Optional[Any] = None,
                extras: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, List[Any]]:
    """Ranker (with plugins) wrapped in :class:`RankerTrain`, unsharded, seeded.

    Args:
        samples: the sample index the model will be fed from; given, the plugins see
            it (``ctx.extras["samples"]``) and their batch transforms are installed
            on it (``RankerPlugin.batch_transform``).
        spec: a ``PluginSpec`` to use instead of reading ``cfg.plugins`` (e.g. the
            run's spec with serving options such as ``store``).
        extras: more entries of the plugins' ``ctx.extras`` (in-memory inputs, e.g. a
            benchmark's ``idproxy_proxies``).

    Returns:
        (model, plugin instances) — the plugins also contribute sharders.
    """
    from torchrec_mm.plugins import (
        PluginContext,
        PluginSpec,
        apply_plugins,
        install_batch_transforms,
        load_spec,
    )

    torch.manual_seed(cfg.seed)
    if spec is None:
        spec = load_spec(cfg.plugins) if cfg.plugins else PluginSpec()
    ranker_cfg = cfg.ranker
    if spec.ranker:
        ranker_cfg = RankerConfig.from_dict({**dataclasses.asdict(cfg.ranker), **spec.ranker})
    context = PluginContext(data_dir=cfg.data, layout=layout, ranker=ranker_cfg,
                            extras={**(extras or {}),
                                    **({} if samples is None else {"samples": samples})})
    plugins = spec.instantiate()
    if samples is not None:
        samples.set_tasks(ranker_cfg.tasks)
        install_batch_transforms(plugins, samples, context)
    tables = apply_plugins(table_configs(layout, ranker_cfg), spec, context, plugins)
    collections = apply_plugins(build_collections(layout, ranker_cfg, tables), spec,
                                context, plugins)
    model = apply_plugins(build_ranker(layout, ranker_cfg, collections=collections), spec,
                          context, plugins)
    return RankerTrain(model, ranker_cfg.num_tasks, ranker_cfg.task_weights or None), plugins


def shard_model(model: nn.Module, cfg: TrainConfig, ctx: DistContext,
                plugins: Optional[List[Any]] = None) -> DistributedModelParallel:
    """Applies the fused embedding optimizer, plans and shards; copies the unsharded
    initial weights into the shards."""
    full_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    emb_params = embedding_parameters(model)
    emb_ids = {id(p) for p in emb_params}
    emb_names = {n for n, p in model.named_parameters() if id(p) in emb_ids}
    opt_cls = EMBEDDING_OPTIMIZERS[cfg.embedding_optimizer]
    apply_optimizer_in_backward(opt_cls, emb_params, {"lr": cfg.embedding_lr})
    from torchrec_mm.plugins import spec_sharders

    sharders = spec_sharders(plugins or [], ctx.device) + default_sharders(ctx.device)
    plan = make_plan(model, ctx.world_size, ctx.device, cfg.sharding_type,
                     batch_size=cfg.batch_size, sharders=sharders)
    dmp = DistributedModelParallel(module=model, device=ctx.device, plan=plan,
                                   sharders=sharders)
    tensors = {f"/{k}": v for k, v in full_state.items()}
    dmp.load_state_dict(ckpt.restore(dmp.state_dict(), None, tensors,
                                     values_from_checkpoint=False))
    # data-parallel tables come back as plain (DDP) parameters: make_optimizer gives
    # them the embedding optimizer, not the dense one
    dmp.embedding_parameter_names = emb_names
    return dmp


def make_optimizer(model: DistributedModelParallel, cfg: TrainConfig,
                   dense_lrs: Optional[Mapping[str, float]] = None) -> CombinedOptimizer:
    """Fused optimizer of the sharded tables + a KeyedOptimizer for the data-parallel
    tables (the embedding optimizer and lr) + one for the dense parameters.

    ``dense_lrs`` maps a parameter-name fragment to its own dense learning rate (e.g.
    ``{"item_tower.": 1e-4}``): the dense parameters whose name contains it get a
    dense optimizer of their own with that lr (the first fragment that matches)."""
    emb_names = getattr(model, "embedding_parameter_names", set())
    rest = {k: v for k, v in in_backward_optimizer_filter(model.named_parameters())
            if v.requires_grad}
    replicated_tables = {k: v for k, v in rest.items() if k in emb_names}
    dense = {k: v for k, v in rest.items() if k not in emb_names}
    dense_cls = torch.optim.Adam if cfg.dense_optimizer == "adam" else torch.optim.SGD
    emb_cls = EMBEDDING_OPTIMIZERS[cfg.embedding_optimizer]
    optimizers = [model.fused_optimizer]
    for fragment, lr in (dense_lrs or {}).items():
        group = {k: v for k, v in dense.items() if fragment in k}
        dense = {k: v for k, v in dense.items() if k not in group}
        if group:
            optimizers.append(KeyedOptimizerWrapper(
                group, lambda p, lr=float(lr): dense_cls(p, lr=lr)))
    optimizers.append(KeyedOptimizerWrapper(dense, lambda p: dense_cls(p, lr=cfg.dense_lr)))
    if replicated_tables:
        optimizers.append(KeyedOptimizerWrapper(
            replicated_tables, lambda p: emb_cls(p, lr=cfg.embedding_lr)))
    return CombinedOptimizer(optimizers)


# ----------------------------------------------------------------------------- train


# options that may change between a run and its resumption
_RESUMABLE_CHANGES = {"resume", "progress", "max_steps", "epochs", "checkpoint_every",
                      "evaluate", "num_workers", "log_every", "eval_batch_size", "out",
                      "pipeline"}


def load_run_config(run: str, data: Optional[str] = None) -> TrainConfig:
    """The :class:`TrainConfig` of a ``torchrec-mm train`` run directory (its
    ``config.json``), with ``data`` replacing the dataset directory when given."""
    path = os.path.join(run, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: '{run}' is not a run directory written "
                                "by `torchrec-mm train`")
    with open(path) as f:
        raw = json.load(f)
    raw["ranker"] = RankerConfig.from_dict(raw["ranker"])
    cfg = TrainConfig(**raw)
    if data:
        cfg.data = data
    return cfg


def normalized_config(raw: Dict[str, Any]) -> Dict[str, Any]:
    """A stored run configuration with the defaults of options added since it was
    written (so a run of an older version compares equal to the same settings now);
    as stored when it no longer parses."""
    try:
        ranker = RankerConfig.from_dict(dict(raw.get("ranker") or {}))
        cfg = TrainConfig(**{**raw, "ranker": ranker})
    except (TypeError, ValueError):
        return raw
    return json.loads(json.dumps(cfg.to_dict()))


# options that change what a run shows, never what it computes: a finished run is the
# same run whatever they were (an experiment re-run with bars on reuses it)
DISPLAY_ONLY = frozenset({"progress"})


def config_changes(stored: Dict[str, Any], cfg: Any, ignore: Iterable[str],
                   normalize: Callable[[Dict[str, Any]], Dict[str, Any]] = normalized_config
                   ) -> Dict[str, Tuple[Any, Any]]:
    """``{option: (stored value, cfg's value)}`` for every option outside ``ignore``
    whose value differs between ``stored`` (a run's stored configuration, read through
    ``normalize``) and ``cfg`` (a config dataclass with ``to_dict``), sorted by name."""
    old = normalize(dict(stored or {}))
    new = json.loads(json.dumps(cfg.to_dict()))
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if k not in ignore and old.get(k) != new.get(k)}


def same_run(stored: Dict[str, Any], cfg: Any,
             normalize: Callable[[Dict[str, Any]], Dict[str, Any]] = normalized_config
             ) -> bool:
    """True when ``stored`` (the ``config`` of a finished run's metrics) has the
    settings of ``cfg``, :data:`DISPLAY_ONLY` options aside."""
    return not config_changes(stored, cfg, DISPLAY_ONLY, normalize)


def _check_resumable(cfg: TrainConfig,
                     normalize: Callable[[Dict[str, Any]], Dict[str, Any]] = normalized_config
                     ) -> None:
    """Refuses to resume a run directory written with another configuration (the stored
    one read through ``normalize``: defaults of options added since it was written)."""
    path = os.path.join(cfg.out, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        diff = config_changes(json.load(f), cfg, _RESUMABLE_CHANGES, normalize)
    if diff:
        raise ValueError(f"{cfg.out} holds a checkpoint of a run with other settings "
                         f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); "
                         "use another --out or --no-resume")


def _train_steps(model: nn.Module, optimizer: CombinedOptimizer, loader: Any,
                 ctx: DistContext, pipeline: Optional[Any]) -> Iterator[torch.Tensor]:
    """One optimizer step per item; yields the step's loss.

    With ``pipeline`` (``TrainPipelineSparseDist``) the sparse input dist of the next
    batch overlaps the current step, as in TorchRec's production loops.
    """
    if pipeline is None:
        for batch in loader:
            loss, _ = model(batch.to(ctx.device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            yield loss
        return
    # the pipeline rewrites the sharded modules' forward; detach it when the loop ends
    # so that evaluation can call the model directly, and re-attach for the next epoch
    pipeline.attach()
    it = iter(loader)
    try:
        while True:
            try:
                out = pipeline.progress(it)  # RankerTrain's (loss, logits, labels)
            except StopIteration:
                return
            yield out[0]
    finally:
        pipeline.detach()


def _worker(cfg: TrainConfig) -> None:
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", cfg.world_size))
    ctx = init_distributed(rank, world)
    try:
        run_rank(cfg, ctx)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_rank(cfg: TrainConfig, ctx: DistContext,
             samples: Optional[RankingSamples] = None) -> Dict[str, Any]:
    """The training loop of one rank (the process group is initialised).

    Args:
        samples: the sample index (default: built from ``cfg.data``).
    """
    if samples is None:
        samples = RankingSamples.from_dataset(cfg.data, cfg.history_length)
    layout = samples.layout
    unsharded, plugins = build_model(cfg, layout, samples)
    model = shard_model(unsharded, cfg, ctx, plugins)
    optimizer = make_optimizer(model, cfg)
    ckpt_root = os.path.join(cfg.out, "checkpoints")

    latest = ckpt.latest_checkpoint(ckpt_root) if cfg.resume else None
    if latest is not None:
        _check_resumable(cfg)
    if ctx.is_main:
        write_json(os.path.join(cfg.out, "config.json"), cfg.to_dict())
    progress: Dict[str, Any] = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "curve": [],
                                "evals": []}
    if latest is not None:
        _, skeleton, tensors = ckpt.read_checkpoint(latest)
        optimizer.init_state()  # KeyedOptimizer loads only into initialised state
        # tensors by path; optimizer param groups stay this rank's own
        model.load_state_dict(ckpt.restore(model.state_dict(), ckpt.child(skeleton, "model"),
                                           tensors, "/model", values_from_checkpoint=False))
        optimizer.load_state_dict(ckpt.restore(
            optimizer.state_dict(), ckpt.child(skeleton, "optimizer"), tensors, "/optimizer",
            values_from_checkpoint=False))
        progress = ckpt.restore(progress, ckpt.child(skeleton, "progress"), tensors,
                                "/progress")
        if ctx.is_main:
            logger.info("resumed from %s at step %d", latest, progress["step"])

    dataset = RankingBatchDataset(samples, "train", cfg.batch_size, shuffle=True,
                                  seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size)
    steps_per_epoch = len(dataset.batches())
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.data}: fewer training samples ({len(samples.rows('train'))}) "
                         f"than one step of batch {cfg.batch_size} x {ctx.world_size} ranks")
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    total_steps = min(total_steps, steps_per_epoch * cfg.epochs)

    def save() -> None:
        ckpt.save_checkpoint(ckpt_root, progress["step"], {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "progress": progress})

    pipeline = None
    if cfg.pipeline:
        from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

        pipeline = TrainPipelineSparseDist(model, optimizer, ctx.device)
    bar = tqdm(total=total_steps, initial=progress["step"], desc=f"train[{cfg.ranker.kind}]",
               disable=not (ctx.is_main and cfg.progress), dynamic_ncols=True)
    t_start = time.time()
    model.train()
    while progress["step"] < total_steps:
        dataset.set_epoch(progress["epoch"], progress["batch_in_epoch"])
        loader = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers,
                            persistent_workers=False)
        running: List[float] = []
        for loss in _train_steps(model, optimizer, loader, ctx, pipeline):
            progress["step"] += 1
            progress["batch_in_epoch"] += 1
            running.append(float(loss.detach()))
            if progress["step"] % cfg.log_every == 0 or progress["step"] == total_steps:
                mean = torch.tensor([float(np.mean(running))])
                if ctx.world_size > 1:
                    dist.all_reduce(mean)
                    mean /= ctx.world_size
                progress["curve"].append({"step": progress["step"],
                                          "epoch": progress["epoch"],
                                          "loss": float(mean)})
                running = []
                bar.set_postfix(loss=f"{float(mean):.4f}")
            bar.update(1)
            if cfg.checkpoint_every and progress["step"] % cfg.checkpoint_every == 0:
                save()
            if progress["step"] >= total_steps:
                break
        else:
            progress["epoch"] += 1
            progress["batch_in_epoch"] = 0
            if cfg.evaluate and progress["step"] < total_steps:
                ev = evaluate_model(model, samples, cfg.eval_batch_size, ctx)
                progress["evals"].append({"step": progress["step"], **ev})
            save()
    bar.close()
    train_seconds = time.time() - t_start
    result: Dict[str, Any] = {"config": cfg.to_dict(), "world_size": ctx.world_size,
                              "steps": progress["step"], "curve": progress["curve"],
                              "train_seconds": train_seconds,
                              "plan": str(model.plan) if ctx.is_main else None}
    if cfg.evaluate:
        final = evaluate_model(model, samples, cfg.eval_batch_size, ctx)
        progress["evals"].append({"step": progress["step"], **final})
        result["eval"] = final
    result["evals"] = progress["evals"]
    save()
    if ctx.is_main:
        write_json(os.path.join(cfg.out, "train_metrics.json"), result)
    return result


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Trains (spawning ``cfg.world_size`` local ranks unless launched by torchrun)
    and returns the contents of ``OUT/train_metrics.json``."""
    os.makedirs(cfg.out, exist_ok=True)
    if launched_by_torchrun() or cfg.world_size == 1:
        _worker(cfg)
    else:
        spawn(_worker, cfg.world_size, (cfg,))
    with open(os.path.join(cfg.out, "train_metrics.json")) as f:
        return json.load(f)


def load_train_config(path: str, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from YAML (``ranker:`` a nested mapping)."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    ranker = RankerConfig.from_dict(raw.pop("ranker", {}) or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {sorted(unknown)}")
    return TrainConfig(ranker=ranker, **raw)
