"""Evaluation metrics: AUC / UAUC / GAUC (sliced: cold/warm, popularity L1..L6, item age)
for rankers, HR / NDCG / MRR@K (faiss search) for retrieval. See :mod:`torchrec_mm.report`
for rendering them."""

from torchrec_mm.metrics.ranking import (  # noqa: F401
    GroupAUC,
    RankingMetricAccumulator,
    auc,
    gauc,
    group_auc,
    ranking_metrics,
    uauc,
    validate_ranking_inputs,
)
from torchrec_mm.metrics.retrieval import (  # noqa: F401
    DEFAULT_KS,
    RetrievalIndexOptions,
    evaluate_retrieval,
    retrieval_metrics_from_scores,
    retrieval_metrics_per_user,
)
from torchrec_mm.metrics.slices import (  # noqa: F401
    cold_warm_item_masks,
    cold_warm_slices,
    first_appearance,
    item_age_slices,
    item_counts,
    popularity_group_names,
    popularity_groups,
    popularity_item_masks,
    popularity_slices,
    sample_masks_from_items,
    sliced_ranking_metrics,
)
