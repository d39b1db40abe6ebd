from dataclasses import dataclass

import pytest
import torch
from torch import nn

from torchrec_mm.models.rankers import (
    RankerCollections,
    RankerConfig,
    RankerTables,
    build_collections,
    build_ranker,
    table_configs,
)
from torchrec_mm.plugins import (
    PluginContext,
    RankerPlugin,
    apply_plugins,
    get_plugin,
    load_spec,
    parse_spec,
    register_plugin,
)
from torchrec_mm.testing import random_samples


@dataclass
class _Opts:
    dim: int = 4
    scale: float = 2.0


class _Scaled(nn.Module):
    def __init__(self, inner: nn.Module, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, dense, sparse):
        return self.inner(dense, sparse) * self.scale


@register_plugin("_test_three_phases")
class _ThreePhases(RankerPlugin):
    Options = _Opts
    calls = []

    def configure_tables(self, tables, ctx):
        type(self).calls.append("tables")
        for t in tables.pooled:
            if t.name == "t_scenario":
                t.embedding_dim = tables.pooled[0].embedding_dim  # unchanged but touched
        return tables

    def wrap_collections(self, collections, ctx):
        type(self).calls.append("collections")
        return collections

    def wrap_model(self, model, ctx):
        type(self).calls.append("model")
        return _Scaled(model, self.options.scale)


def test_phases_run_in_order_and_take_effect():
    s = random_samples(num_interactions=2000, seed=0)
    spec = parse_spec({"plugins": [{"name": "_test_three_phases", "options": {"scale": 3.0}}]})
    plugins = spec.instantiate()
    cfg = RankerConfig(kind="dlrm")
    ctx = PluginContext(layout=s.layout, ranker=cfg)
    _ThreePhases.calls.clear()
    tables = apply_plugins(table_configs(s.layout, cfg), spec, ctx, plugins)
    assert isinstance(tables, RankerTables)
    cols = apply_plugins(build_collections(s.layout, cfg, tables), spec, ctx, plugins)
    assert isinstance(cols, RankerCollections)
    torch.manual_seed(0)
    base = build_ranker(s.layout, cfg, collections=cols)
    model = apply_plugins(base, spec, ctx, plugins)
    assert _ThreePhases.calls == ["tables", "collections", "model"]
    b = s.make_batch(s.rows("train")[:8])
    torch.testing.assert_close(model(b.dense_features, b.sparse_features),
                               3.0 * base(b.dense_features, b.sparse_features))


def test_spec_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown option"):
        parse_spec({"plugins": [{"name": "_test_three_phases", "options": {"x": 1}}]},
                   "s.yaml").instantiate()
    with pytest.raises(ValueError, match=r"plugins\[0\].*unknown plugin 'nope'"):
        parse_spec({"plugins": ["nope"]}, "s.yaml").instantiate()
    with pytest.raises(ValueError, match="needs a 'name'"):
        parse_spec({"plugins": [{"options": {}}]})
    with pytest.raises(ValueError, match="unknown top-level"):
        parse_spec({"plugin": []})
    bad = tmp_path / "bad.yaml"
    bad.write_text("plugins: [\n")
    with pytest.raises(ValueError, match="bad.yaml: invalid YAML"):
        load_spec(str(bad))
    with pytest.raises(TypeError, match="apply_plugins takes"):
        apply_plugins({"not": "a model"}, parse_spec({}))


def test_registering_a_second_class_under_a_name_fails():
    with pytest.raises(ValueError, match="already registered"):
        @register_plugin("_test_three_phases")
        class _Other(RankerPlugin):
            pass


def test_builtin_plugins_are_found_by_name():
    assert get_plugin("content_feature").name == "content_feature"


def test_repo_specs_parse():
    """Every YAML under plugins/ is a valid plugin spec or experiment spec."""
    import glob
    import os

    import yaml

    from torchrec_mm.experiment import load_experiment

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    specs = glob.glob(os.path.join(root, "plugins", "*.yaml"))
    assert specs
    for path in specs:
        with open(path) as f:
            raw = yaml.safe_load(f)
        if "variants" in raw:
            exp = load_experiment(path)
            groups = [v.get("plugins") or [] for v in exp["variants"].values() if v]
        else:
            load_spec(path)  # validates the whole spec, not only its plugin list
            groups = [raw["plugins"]]
        for plugins in groups:
            for p in parse_spec({"plugins": plugins}, path).instantiate():
                assert isinstance(p, RankerPlugin)
