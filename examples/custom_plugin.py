"""A complete third-party plugin: a learnable per-item bias added to the ranker's logit.

It shows the three phases of the plugin contract (``torchrec_mm.plugins``):

* phase 1 (``configure_tables``) is not needed here;
* phase 2 (``wrap_collections``) is not needed either;
* phase 3 (``wrap_model``) wraps the built ranker in :class:`ItemBiasRanker`, which holds
  its own ``EmbeddingBagCollection`` (one table keyed by ``item_id``). DMP shards
  that table like any other, and the planner sees it: nothing else to register.

Run it (2 ranks, generated data, a few seconds)::

    python examples/custom_plugin.py --out /tmp/custom_plugin

The spec it writes names this module under ``imports`` so every spawned rank registers
the plugin before building the model.
"""

import argparse
import os
import sys
from dataclasses import dataclass

import torch
import yaml
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mm.plugins import PluginContext, RankerPlugin, register_plugin


class ItemBiasRanker(nn.Module):
    """``logit = ranker(dense, kjt) + b[item_id]``; same call signature as the ranker."""

    def __init__(self, ranker: nn.Module, num_items: int, feature: str = "item_id") -> None:
        super().__init__()
        self.ranker = ranker
        self.feature = feature
        self.bias = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            # fbgemm's fused kernels need dims divisible by 4: the bias is a row's sum
            name="t_item_bias", num_embeddings=num_items, embedding_dim=4,
            feature_names=[feature], init_fn=nn.init.zeros_)])

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor
                ) -> torch.Tensor:
        """Returns [B, 1] logits."""
        bias = self.bias(sparse_features)[self.feature].sum(dim=1, keepdim=True)
        return self.ranker(dense_features, sparse_features) + bias


@dataclass
class ItemBiasOptions:
    feature: str = "item_id"


@register_plugin("item_bias")
class ItemBiasPlugin(RankerPlugin):
    Options = ItemBiasOptions

    def wrap_model(self, model: nn.Module, ctx: PluginContext) -> nn.Module:
        return ItemBiasRanker(model, ctx.layout.num_items, self.options.feature)


def main() -> None:
    from torchrec_mm.data.split import make_split
    from torchrec_mm.data.synth import SynthConfig, generate
    from torchrec_mm.models.rankers import RankerConfig
    from torchrec_mm.training.trainer import TrainConfig, train

    ap = argparse.ArgumentParser(description="train DLRM with the item_bias plugin")
    ap.add_argument("--out", default="out/custom_plugin")
    ap.add_argument("--world-size", type=int, default=2)
    args = ap.parse_args()
    data = os.path.join(args.out, "data")
    if not os.path.exists(os.path.join(data, "meta.json")):
        generate(SynthConfig(num_users=500, num_items=800, num_interactions=40_000), data)
        make_split(data)
    spec = os.path.join(args.out, "item_bias.yaml")
    with open(spec, "w") as f:
        yaml.safe_dump({"imports": ["custom_plugin"],
                        "plugins": [{"name": "item_bias"}]}, f)
    result = train(TrainConfig(data=data, out=os.path.join(args.out, "run"),
                               ranker=RankerConfig(kind="dlrm"), plugins=spec,
                               world_size=args.world_size, epochs=1, progress=False))
    print({s: round(result["eval"][s]["auc"], 4) for s in ("test", "warm", "cold")})
    print("plan:\n" + (result["plan"] or ""))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
