"""``torchrec-mm data ...``: import, synth, split, stats, validate.

Examples::

    torchrec-mm data synth --out data/synth --users 2000 --items 5000 --interactions 200000
    torchrec-mm data import --format movielens-100k --src ~/ml-100k --out data/ml100k
    torchrec-mm data split --data data/ml100k --cold-item-frac 0.1 --test-time-frac 0.1
    torchrec-mm data stats --data data/ml100k
    torchrec-mm data validate --data data/ml100k --skip-bad
"""

import argparse
import logging
from typing import Any, Callable

logger = logging.getLogger(__name__)


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _three_numbers(s: str) -> "tuple[float, float, float]":
    """``H,S,A`` -> three floats (one per scenario: homefeed, search, ads)."""
    try:
        v = tuple(float(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers H,S,A, got '{s}'") from None
    if len(v) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers H,S,A, got '{s}'")
    return v  # type: ignore[return-value]


def _scenario_shares(s: str) -> "tuple[float, float, float]":
    """``H,S,A`` -> three positive shares summing to 1 (homefeed, search, ads)."""
    v = _three_numbers(s)
    if min(v) <= 0 or abs(sum(v) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(
            f"expected three positive shares H,S,A summing to 1, got '{s}'")
    return v


def _pop_shares(s: str) -> "tuple[float, float, float]":
    """``H,S,A`` -> three shares in [0, 1] (per scenario, not summing to anything)."""
    v = _three_numbers(s)
    if not all(0.0 <= x <= 1.0 for x in v):
        raise argparse.ArgumentTypeError(f"expected three shares H,S,A in [0, 1], got '{s}'")
    return v


def _non_negative(s: str) -> float:
    v = float(s)
    if not v >= 0.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _unit_interval(include_one: bool) -> Callable[[str], float]:
    """An argparse type: a number in [0, 1] (``include_one``) or [0, 1)."""
    def parse(s: str) -> float:
        v = float(s)
        if not (0.0 <= v <= 1.0 if include_one else 0.0 <= v < 1.0):
            raise argparse.ArgumentTypeError(
                f"must be in [0, 1{']' if include_one else ')'}, got {v}")
        return v
    return parse


_fraction = _unit_interval(include_one=False)
_share = _unit_interval(include_one=True)


def register(subparsers: Any) -> None:
    """Adds the ``data`` command and its subcommands."""
    from torchrec_mm.data.importers import IMPORTERS
    from torchrec_mm.data.synth import MAX_TOPICS, SynthConfig

    data = subparsers.add_parser(
        "data", help="import, generate, split and inspect datasets",
        description="Datasets in the torchrec-mm format (docs/data_format.md).")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser(
        "import", help="convert a public dataset into the torchrec-mm format",
        description="Convert MovieLens, Amazon Reviews 2018 or RED-MMU data. The output "
        "appears only when the import succeeded.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--format", required=True, choices=sorted(IMPORTERS),
                   help="source format")
    p.add_argument("--src", required=True,
                   help="source: the release directory (MovieLens) or the reviews / user "
                   "JSON file (amazon2018, redmmu; .gz accepted)")
    p.add_argument("--out", required=True, help="dataset directory to create")
    p.add_argument("--skip-bad", action="store_true",
                   help="drop and count bad records instead of stopping at the first")
    p.add_argument("--max-records", type=_positive_int, default=None,
                   help="import at most this many interactions")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p.add_argument("--label-threshold", type=float, default=4.0,
                   help="rating datasets: label = rating >= threshold")
    p.add_argument("--meta", default=None, help="amazon2018: metadata JSON lines (item text)")
    p.add_argument("--items", default=None,
                   help="redmmu: item content JSON lines (item_id, title/text, image_path)")
    p.set_defaults(func=_import)

    p = sub.add_parser(
        "synth", help="generate the synthetic dataset with planted structure",
        description="Generate the embedded default dataset: topics with real English "
        "words, users with interests and a cross-scenario intent, homefeed/search/ads "
        "impressions and clicks (see torchrec_mm/data/synth.py). Same seed, same files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = SynthConfig()
    p.add_argument("--out", required=True, help="dataset directory to create")
    p.add_argument("--users", type=_positive_int, default=d.num_users, help="number of users")
    p.add_argument("--items", type=_positive_int, default=d.num_items, help="number of items")
    p.add_argument("--interactions", type=_positive_int, default=d.num_interactions,
                   help="number of interactions")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--topics", type=int, default=d.num_topics,
                   help=f"number of latent topics (2..{MAX_TOPICS})")
    p.add_argument("--days", type=float, default=d.days, help="time span in days")
    p.add_argument("--ctr", type=float, default=d.target_ctr, help="overall click rate")
    p.add_argument("--scenario-shares", type=_scenario_shares,
                   default=",".join(str(x) for x in d.scenario_shares),
                   help="mean share of the homefeed, search and ads impressions (H,S,A)")
    p.add_argument("--intent-share-sparse", type=_share, default=d.intent_share_sparse,
                   help="share of a user's search/ads impressions drawn from their "
                   "cross-scenario intent topic once it started")
    p.add_argument("--intent-share-homefeed", type=_share, default=d.intent_share_homefeed,
                   help="the same share in the homefeed (0: the intent shows in the "
                   "homefeed only through popular items and clicks on items that touch it)")
    p.add_argument("--zipf-exponent", type=_non_negative, default=d.zipf_exponent,
                   help="item popularity ~ rank^-exponent (0: every item equally popular)")
    p.add_argument("--pop-shares", type=_pop_shares,
                   default=",".join(str(x) for x in d.pop_share),
                   help="per scenario (H,S,A), the share of impressions drawn by "
                   "popularity rather than by interest")
    p.add_argument("--quality-std", type=_non_negative, default=d.quality_std,
                   help="std of the items' click-quality bias (0: none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p.set_defaults(func=_synth)

    p = sub.add_parser(
        "split", help="choose cold items and the time cut (writes split.json)",
        description="Cold items: a popularity-stratified random fraction of the items with "
        "interactions; all their interactions are test_cold. Held-out users (optional): a "
        "random fraction of the users; all their other interactions are test_warm. Of the "
        "rest, interactions at or after the (1 - test-time-frac) time quantile are "
        "test_warm, the others train.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--cold-item-frac", type=_fraction, default=0.1,
                   help="fraction of items made cold")
    p.add_argument("--test-time-frac", type=_fraction, default=0.1,
                   help="fraction of warm interactions (the latest) in test_warm")
    p.add_argument("--test-user-frac", type=_fraction, default=0.0,
                   help="fraction of users held out: all their interactions are test "
                   "(test_warm, or test_cold for cold items), as the RED-Rec protocol's "
                   "evaluation users, who are not training users")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the cold-item and held-out-user draws")
    p.set_defaults(func=_split)

    p = sub.add_parser("stats", help="print counts, CTR, scenario shares and the split",
                       description="Read the whole dataset and print its statistics.")
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--skip-bad", action="store_true", help="skip invalid rows (counted)")
    p.set_defaults(func=_stats)

    p = sub.add_parser(
        "validate", help="check every file of a dataset",
        description="Check meta.json, items, users and every interaction row; exit 2 "
        "with the file, row and field of the first problem, or (with --skip-bad) report "
        "how many rows are bad.")
    p.add_argument("--data", required=True, help="dataset directory")
    p.add_argument("--skip-bad", action="store_true",
                   help="count bad rows instead of stopping at the first")
    p.set_defaults(func=_validate)


def _import(args: argparse.Namespace) -> int:
    from torchrec_mm.data.importers import import_dataset

    options = {"skip_bad": args.skip_bad, "max_records": args.max_records,
               "overwrite": args.overwrite}
    if args.format.startswith("movielens") or args.format == "amazon2018":
        options["label_threshold"] = args.label_threshold
    if args.meta is not None:
        if args.format != "amazon2018":
            raise ValueError("--meta is only used by --format amazon2018")
        options["meta_path"] = args.meta
    if args.items is not None:
        if args.format != "redmmu":
            raise ValueError("--items is only used by --format redmmu")
        options["items_path"] = args.items
    result = import_dataset(args.format, args.src, args.out, **options)
    m = result.meta
    print(f"wrote {args.out}: {m.num_interactions} interactions, {m.num_users} users, "
          f"{m.num_items} items, scenarios {m.scenarios}, actions {m.actions}")
    if result.stats.bad_rows:
        print(f"skipped {result.stats.bad_rows} bad records: {result.stats.bad_by_field}")
        for e in result.stats.examples:
            print(f"  {e}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from torchrec_mm.data.synth import SynthConfig, generate

    cfg = SynthConfig(num_users=args.users, num_items=args.items,
                      num_interactions=args.interactions, seed=args.seed,
                      num_topics=args.topics, days=args.days, target_ctr=args.ctr,
                      scenario_shares=args.scenario_shares,
                      intent_share_sparse=args.intent_share_sparse,
                      intent_share_homefeed=args.intent_share_homefeed,
                      zipf_exponent=args.zipf_exponent, pop_share=args.pop_shares,
                      quality_std=args.quality_std)
    meta = generate(cfg, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: {meta.num_interactions} interactions, {meta.num_users} users, "
          f"{meta.num_items} items, {cfg.num_topics} topics (seed {cfg.seed})")
    return 0


def _split(args: argparse.Namespace) -> int:
    from torchrec_mm.data.split import make_split, split_summary

    split = make_split(args.data, args.cold_item_frac, args.test_time_frac, args.seed,
                       args.test_user_frac)
    print(split_summary(split))
    return 0


def _stats(args: argparse.Namespace) -> int:
    import os

    from torchrec_mm.data.io import validate_dataset
    from torchrec_mm.data.schema import SPLIT_FILE
    from torchrec_mm.data.split import load_split, split_summary

    stats = validate_dataset(args.data, skip_bad=args.skip_bad)
    print(stats.format())
    if os.path.exists(os.path.join(args.data, SPLIT_FILE)):
        print(split_summary(load_split(args.data)))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from torchrec_mm.data.io import validate_dataset

    stats = validate_dataset(args.data, skip_bad=args.skip_bad)
    if stats.read.bad_rows:
        print(f"{args.data}: {stats.read.bad_rows} bad rows "
              f"({stats.read.bad_by_field}); {stats.num_interactions} valid")
        for e in stats.read.examples:
            print(f"  {e}")
        return 1
    print(f"{args.data}: OK ({stats.num_interactions} interactions, {stats.num_users} users, "
          f"{stats.num_items} items)")
    return 0
