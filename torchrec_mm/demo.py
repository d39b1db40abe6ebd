"""``torchrec-mm demo``: the main job, end to end on the embedded synthetic data.

synthetic data → cold-start split → encode items with MiniLM → train the baseline
rankers on 2 ranks under DMP → the method plugins next to them (content as a feature;
IDProxy: stage-1 proxies aligned to the DLRM run's item-ID table, then stage 1+2 in the
target-attention ranker's ID slots; QARM: alignment on mined item2item pairs, VQ/RQ
codes, code features and the CrossNet in DLRM) → evaluate warm / cold / popularity /
item-age slices → RED-Rec retrieval (a small user tower over the MiniLM content vectors)
against the ID-only SASRec on the RED-Rec protocol (``--no-retrieval`` skips it) →
``OUT/metrics.json`` + ``OUT/report.html``.

Every stage is resumable: re-running the command reuses the data and the finished
encode chunks, and training resumes from its last checkpoint.
"""

import argparse
import dataclasses
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import yaml

DEFAULT_RANKERS = ("dlrm", "target_attention", "dlrm+content_feature",
                   "target_attention+idproxy", "dlrm+qarm")
#: the run whose item-ID table the IDProxy targets and QARM's retrieval pairs come from
ID_SPACE_RUN = "dlrm"


def prepare_plugin(plugin: str, out: str, data_dir: str, content_dir: str,
                   timings: Dict[str, float]) -> Dict[str, Any]:
    """Builds what a plugin variant needs (once) and returns its plugin options."""
    if plugin == "content_feature":
        return {"store": os.path.abspath(content_dir)}
    id_run = os.path.join(out, "runs", ID_SPACE_RUN)
    if plugin in ("idproxy", "qarm") and not os.path.exists(
            os.path.join(id_run, "train_metrics.json")):
        raise ValueError(f"demo variant with {plugin} needs the '{ID_SPACE_RUN}' run first "
                         "(list it earlier in --rankers)")
    t = time.time()
    if plugin == "idproxy":
        from torchrec_mm.idproxy.artifacts import META_FILE
        from torchrec_mm.idproxy.coarse import CoarseFitConfig, fit_coarse

        proxies = os.path.join(out, "idproxy")
        if not os.path.exists(os.path.join(proxies, META_FILE)):
            m = fit_coarse(data_dir, id_run, proxies, CoarseFitConfig(
                trainable_layers=1, epochs=1, max_length=48, lr_head=3e-3))
            print(f"idproxy stage 1: held-out recall@10 {m['baseline']['recall@10']:.3f} -> "
                  f"{m['final']['recall@10']:.3f} (chance {m['chance']['recall@10']:.3f})")
        timings["idproxy_fit"] = time.time() - t
        return {"proxies": os.path.abspath(proxies)}
    if plugin == "qarm":
        from torchrec_mm.qarm.align import AlignConfig
        from torchrec_mm.qarm.cli import run_align
        from torchrec_mm.qarm.steps import qarm_codes_step

        aligned = os.path.join(out, "qarm", "aligned")
        if not os.path.exists(os.path.join(aligned, "align_metrics.json")):
            # frozen encoder (its pooled states from the content store) + trained head:
            # seconds on CPU; `torchrec-mm qarm align` fine-tunes encoder layers too
            m = run_align(data_dir, aligned, AlignConfig(
                trainable_layers=0, epochs=4, lr_head=3e-3,
                content_store=os.path.abspath(content_dir)), id_run)
            print(f"qarm align: held-out pair recall@10 {m['before']['recall@10']:.3f} -> "
                  f"{m['after']['recall@10']:.3f}")
        codes = os.path.join(out, "qarm", "codes")
        qarm_codes_step(data_dir, codes, {
            "reps": os.path.join(aligned, "aligned.safetensors"), "codebook_items": "train",
            "vq_k": 25, "rq_levels": 6, "rq_codebook_size": 32}, {})
        timings["qarm_prepare"] = time.time() - t
        return {"codes": os.path.abspath(codes), "user_vq": True, "user_len": 8}
    raise ValueError(f"demo: no preparation known for plugin '{plugin}'")


#: the demo's RED-Rec user tower: the top layers of the content encoder's LM (MiniLM)
RETRIEVAL_LM_LAYERS = 2
RETRIEVAL_MAX_USERS = 1000


def retrieval_stage(out: str, data_dir: str, content_dir: Optional[str],
                    model_path: Optional[str], seed: int, max_steps: Optional[int],
                    sasrec_epochs: int, timings: Dict[str, float]
                    ) -> Tuple[Dict[str, Any], Dict[str, Any], Any]:
    """RED-Rec vs SASRec on the RED-Rec protocol (both resumable: a finished run of the
    same settings is reused).

    RED-Rec: user tower = the top :data:`RETRIEVAL_LM_LAYERS` layers of the content
    LM (the paper initialises both towers from one LM), item side = the frozen content
    vectors of ``content_dir`` (item IDs without it), 2-D mixing, last_n 64, 3 epochs
    (or ``max_steps``). SASRec: item IDs only, ``sasrec_epochs`` epochs, the same
    history length and cases.

    Returns:
        ``(metrics, info, report section)``: metrics ``{"redrec": {HR@K, NDCG@K, MRR@K,
        MRR}, "sasrec": {...}}``, info: cases, pool size, steps.
    """
    from torchrec_mm.redrec.experiment import (
        PROTOCOL_FIELDS,
        metric_values,
        retrieval_section,
        run_redrec,
        run_sasrec,
        truncate_lm,
    )
    from torchrec_mm.redrec.train import RedRecConfig

    root = os.path.join(out, "redrec")
    t = time.time()
    lm = truncate_lm(os.path.join(root, "lm"), RETRIEVAL_LM_LAYERS, model_path)
    items = ({"item_embedding": "content", "content_store": os.path.abspath(content_dir)}
             if content_dir else {})
    cfg = RedRecConfig(data=data_dir, out=os.path.join(root, "run"), model_path=lm,
                       embedding_dim=64, last_n=64, window=10, num_negatives=512,
                       batch_size=32, epochs=3, max_steps=max_steps, dense_lr=5e-4,
                       seed=seed, eval_max_users=RETRIEVAL_MAX_USERS, **items)
    red = run_redrec(cfg)
    timings["retrieval_redrec"] = time.time() - t
    t = time.time()
    sas = run_sasrec(data_dir, os.path.join(root, "sasrec"),
                     {"dim": 64, "max_len": cfg.resolved_eval_last_n,
                      "epochs": sasrec_epochs, "batch_size": 16, "seed": seed},
                     {k: getattr(cfg, k) for k in PROTOCOL_FIELDS}, progress=True)
    timings["retrieval_sasrec"] = time.time() - t
    if red["eval"]["num_users"] != sas["eval"]["num_users"]:
        raise RuntimeError("demo retrieval: RED-Rec and SASRec were evaluated on different "
                           "cases")
    info = {"cases": red["eval"]["num_users"], "pool_size": red["eval"]["pool_size"],
            "redrec_steps": red["steps"], "redrec_lm_layers": RETRIEVAL_LM_LAYERS,
            "redrec_items": cfg.item_embedding, "sasrec_epochs": len(sas["train"]["loss"])}
    metrics = {"redrec": metric_values(red["eval"]), "sasrec": metric_values(sas["eval"])}
    label = "content" if content_dir else "ID"
    section = retrieval_section(
        "RED-Rec retrieval", {f"RED-Rec ({label} items)": [metrics["redrec"]],
                              "SASRec (ID only)": [metrics["sasrec"]]},
        text=(f"RED-Rec's user tower (the top {RETRIEVAL_LM_LAYERS} layers of the content "
              f"LM over the 2-D mixed homefeed/search/ads events, last_n {cfg.last_n}, "
              f"{cfg.interests_per_scenario} interests per scenario, {red['steps']} steps; "
              f"items: {'the frozen MiniLM content vectors' if content_dir else 'ID table'})"
              " against the ID-only SASRec baseline, both on the RED-Rec protocol: a "
              "random cutoff per user in the test period, the next 3 events as targets "
              "(cold items included), the whole catalogue as the candidate pool."),
        note=f"{info['cases']} users, pool {info['pool_size']} items, one seed")
    return metrics, info, section


def content_topic_agreement(store_dir: str, data_dir: str, k: int = 10,
                            sample: int = 2000, seed: int = 0) -> Dict[str, float]:
    """How well the content embeddings recover the synthetic items' latent topics:
    the share of each sampled item's k nearest neighbours (cosine, faiss exact search)
    that have its dominant topic, vs the chance rate."""
    import faiss

    from torchrec_mm.content.store import ContentStore
    from torchrec_mm.data.synth import TRUTH_FILE, SynthTruth

    if not os.path.exists(os.path.join(data_dir, TRUTH_FILE)):
        return {}
    topics = SynthTruth.load(data_dir).item_topic
    store = ContentStore(store_dir)
    ids = store.item_ids.long()
    emb = store.get(ids).float().numpy().astype(np.float32)
    faiss.normalize_L2(emb)
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    rng = np.random.default_rng(seed)
    q = rng.choice(len(ids), min(sample, len(ids)), replace=False)
    _, nn = index.search(emb[q], k + 1)
    item_topics = topics[ids.numpy()]
    same = (item_topics[nn[:, 1:]] == item_topics[q][:, None]).mean()
    chance = float(np.sum(np.bincount(item_topics) ** 2) / len(item_topics) ** 2)
    return {f"topic_agreement@{k}": float(same), "chance": chance}


def run_demo(out: str, users: int = 2000, items: int = 3000, interactions: int = 150_000,
             rankers: List[str] = list(DEFAULT_RANKERS), world_size: int = 2,
             epochs: int = 3, batch_size: int = 256, model_path: Optional[str] = None,
             encode: bool = True, seed: int = 0, retrieval: bool = True,
             retrieval_steps: Optional[int] = None, sasrec_epochs: int = 10
             ) -> Dict[str, Any]:
    from torchrec_mm.content.encode_job import encode_items
    from torchrec_mm.content.encoder import ContentEncoderConfig
    from torchrec_mm.data.io import is_dataset_dir, validate_dataset
    from torchrec_mm.data.split import load_split, make_split, split_summary
    from torchrec_mm.data.synth import SynthConfig, generate
    from torchrec_mm.models.rankers import RankerConfig
    from torchrec_mm.report import Section, Table, write_report
    from torchrec_mm.training.trainer import TrainConfig, train

    os.makedirs(out, exist_ok=True)
    timings: Dict[str, float] = {}
    data_dir = os.path.join(out, "data")

    t = time.time()
    if not is_dataset_dir(data_dir):
        generate(SynthConfig(num_users=users, num_items=items, num_interactions=interactions,
                             seed=seed), data_dir)
    if not os.path.exists(os.path.join(data_dir, "split.json")):
        make_split(data_dir, cold_item_frac=0.1, test_time_frac=0.1, seed=seed)
    stats = validate_dataset(data_dir)
    split = load_split(data_dir)
    timings["data"] = time.time() - t
    print(stats.format())
    print(split_summary(split))

    content: Dict[str, Any] = {}
    if encode:
        t = time.time()
        store_dir = os.path.join(out, "content")
        cfg = ContentEncoderConfig(model_path=model_path) if model_path else None
        encode_items(data_dir, store_dir, cfg, batch_size=64)
        timings["encode"] = time.time() - t
        content = {"store": store_dir, **content_topic_agreement(store_dir, data_dir)}

    results: Dict[str, Any] = {}
    curves: Dict[str, List[Dict[str, Any]]] = {}
    slices: Dict[str, Any] = {}
    for variant in rankers:
        kind, _, plugin = variant.partition("+")
        spec_path = None
        if plugin:
            if not encode:
                raise ValueError(f"variant '{variant}' needs the content store: drop "
                                 "--no-encode")
            options = prepare_plugin(plugin, out, data_dir, os.path.join(out, "content"),
                                     timings)
            spec_path = os.path.join(out, "plugins", f"{plugin}.yaml")
            os.makedirs(os.path.dirname(spec_path), exist_ok=True)
            with open(spec_path, "w") as f:
                yaml.safe_dump({"plugins": [{"name": plugin, "options": options}]}, f)
        t = time.time()
        cfg = TrainConfig(data=data_dir, out=os.path.join(out, "runs", variant),
                          ranker=RankerConfig(kind=kind), plugins=spec_path,
                          world_size=world_size,
                          epochs=epochs, batch_size=batch_size, seed=seed,
                          checkpoint_every=200)
        r = train(cfg)
        timings[f"train_{variant}"] = time.time() - t
        results[variant] = {"eval": r["eval"], "steps": r["steps"],
                         "train_seconds": r["train_seconds"], "world_size": r["world_size"]}
        curves[variant] = r["curve"] + [
            {"step": e["step"], "test_auc": e["test"]["auc"], "cold_auc": e["cold"]["auc"]}
            for e in r["evals"]]
        slices[variant] = r["eval"]

    metrics = {"dataset": dataclasses.asdict(stats),
               "content": content, "rankers": results, "timings_s": timings}
    sections = []
    retrieval_section = None
    if retrieval:
        metrics["retrieval"], metrics["retrieval_info"], retrieval_section = retrieval_stage(
            out, data_dir, os.path.join(out, "content") if encode else None, model_path,
            seed, retrieval_steps, sasrec_epochs, timings)
        print("retrieval (RED-Rec vs SASRec): " + "  ".join(
            f"{k} {metrics['retrieval']['redrec'][k]:.4f} vs "
            f"{metrics['retrieval']['sasrec'][k]:.4f}" for k in ("HR@10", "HR@100", "MRR")))
    if content:
        sections.append(Section(
            title="Content encoder",
            text=("Items encoded with the content encoder (MiniLM by default); the "
                  "table shows how often an item's nearest neighbours in content space "
                  "share its latent topic, against chance."),
            tables=[Table.from_flat("topic recovery by content nearest neighbours",
                                    {k: v for k, v in content.items() if k != "store"})]))
    if retrieval_section is not None:
        sections.append(retrieval_section)
    path = write_report(
        out, metrics, curves=curves, title="torchrec-mm demo: baseline rankers and the method plugins",
        config={"users": users, "items": items, "interactions": interactions,
                "world_size": world_size, "epochs": epochs, "batch_size": batch_size,
                "rankers": rankers, "retrieval": retrieval,
                "retrieval_steps": retrieval_steps, "sasrec_epochs": sasrec_epochs},
        sections=sections, slice_metrics=slices,
        slice_order=["test", "warm", "cold", "L1", "L2", "L3", "L4", "L5", "L6"]
        + [k for k in next(iter(slices.values()), {}) if k.startswith("age")])
    print(f"report: {path}\nmetrics: {os.path.join(out, 'metrics.json')}")
    return metrics


def _run(args: argparse.Namespace) -> int:
    run_demo(args.out, users=args.users, items=args.items, interactions=args.interactions,
             rankers=args.rankers.split(","), world_size=args.world_size, epochs=args.epochs,
             batch_size=args.batch_size, model_path=args.model, encode=not args.no_encode,
             seed=args.seed, retrieval=not args.no_retrieval,
             retrieval_steps=args.retrieval_steps, sasrec_epochs=args.sasrec_epochs)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="run the main job on generated data and write a report",
        description=__doc__.split("\n\n")[1])
    p.add_argument("--out", default="out/demo", help="output directory")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--items", type=int, default=3000)
    p.add_argument("--interactions", type=int, default=150_000)
    p.add_argument("--rankers", default=",".join(DEFAULT_RANKERS),
                   help="comma-separated variants to train: a ranker kind (dlrm, dlrm_dcn, "
                   "target_attention), optionally '+plugin' (e.g. dlrm+content_feature)")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256, help="per-rank batch size")
    p.add_argument("--model", help="local Hugging Face checkpoint for the content encoder "
                   "(default: the bundled MiniLM)")
    p.add_argument("--no-encode", action="store_true", help="skip content encoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-retrieval", action="store_true",
                   help="skip the RED-Rec vs SASRec retrieval stage")
    p.add_argument("--retrieval-steps", type=int,
                   help="RED-Rec training steps of the retrieval stage (default 3 epochs)")
    p.add_argument("--sasrec-epochs", type=int, default=10,
                   help="SASRec epochs of the retrieval stage")
    p.set_defaults(func=_run)
