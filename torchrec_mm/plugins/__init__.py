"""Plugin mechanics: how a method (IDProxy, QARM, RED-Rec, your own) changes a ranker.

The contract
------------
A plugin is a subclass of :class:`RankerPlugin` registered under a name with
:func:`register_plugin`. It is switched on by a YAML spec (``plugins/*.yaml``)::

    plugins:
      - name: my_plugin
        options: {alpha: 0.5}

and acts in up to three phases, each through :func:`apply_plugins` (which dispatches on
what it is given):

1. **table configs** — ``configure_tables(tables, ctx)`` receives the ranker's
   :class:`~torchrec_mm.models.rankers.RankerTables` (the
   ``EmbeddingBagConfig``/``EmbeddingConfig`` lists) and returns them, changed or not
   (add a table, change a dim, add a feature to a table);
2. **embedding collections** — ``wrap_collections(collections, ctx)`` receives the
   built :class:`~torchrec_mm.models.rankers.RankerCollections` (the EBC and EC)
   *before the ranker module is constructed* and returns them, typically with a module
   that *holds* the EBC/EC (never a subclass: DMP picks sharders by exact type) and
   returns the same ``KeyedTensor``/``JaggedTensor`` keys — values replaced (a proxy in
   an ID slot) or keys added (a new feature, listed by the wrapper's
   ``embedding_bag_configs()``/``embedding_configs()`` so that DLRM's interaction arch
   is sized for it). The ranker's code does not change;
3. **the built model** — ``wrap_model(model, ctx)`` returns the model, wrapped or with
   modules replaced (e.g. a different head).

A plugin whose modules must themselves be sharded returns their sharders from
``sharders(device)``; the trainer hands them to the planner and DMP before the stock ones.

Plugins are applied in spec order. A name not yet registered is looked up as the
module ``torchrec_mm.plugins.<name>`` (built-in plugins such as ``content_feature``),
then ``torchrec_mm.<name>.plugin`` (the package's methods), then in the
``torchrec_mm.plugins`` entry-point group (third-party packages). A spec may also list
modules to import first (``imports: [my_package.my_plugins]``), which is how a plugin
defined in your own code reaches every spawned rank.
"""

import dataclasses
import importlib
import inspect
import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Type, TypeVar, Union

import torch
import yaml
from torch import nn

from torchrec_mm.data.batching import FeatureLayout

_REGISTRY: Dict[str, Type["RankerPlugin"]] = {}
P = TypeVar("P", bound=Type["RankerPlugin"])


@dataclass
class PluginContext:
    """What a plugin may read while it configures or wraps a ranker.

    Attributes:
        data_dir: the dataset directory (content stores and fitted artefacts live
            beside it or are named by the plugin's options).
        layout: the feature layout of the dataset.
        ranker: the ranker config (``torchrec_mm.models.rankers.RankerConfig``).
        extras: free-form values passed by the caller (e.g. paths of fitted models).
    """

    data_dir: Optional[str] = None
    layout: Optional[FeatureLayout] = None
    ranker: Any = None
    extras: Dict[str, Any] = field(default_factory=dict)

    def resolve_path(self, path: str) -> str:
        """A plugin option's path: absolute as given; a relative one is looked up next
        to the dataset directory first (``DIR/../<path>``), then from the cwd."""
        if not os.path.isabs(path) and self.data_dir:
            candidate = os.path.join(os.path.dirname(os.path.abspath(self.data_dir)), path)
            if os.path.exists(candidate):
                return candidate
        return path


class RankerPlugin:
    """Base class of plugins. Options arrive as keyword arguments; a subclass that
    declares an ``Options`` dataclass gets them validated into ``self.options``."""

    name: ClassVar[str] = ""
    Options: ClassVar[Optional[type]] = None

    def __init__(self, **options: Any) -> None:
        if self.Options is not None:
            known = {f.name for f in dataclasses.fields(self.Options)}
            unknown = set(options) - known
            if unknown:
                raise ValueError(f"plugin '{self.name}': unknown option(s) {sorted(unknown)}; "
                                 f"known: {sorted(known)}")
            self.options = self.Options(**options)
        else:
            self.options = options

    def configure_tables(self, tables: Any, ctx: PluginContext) -> Any:
        """Phase 1: edit table configs before the model is built."""
        return tables

    def wrap_collections(self, collections: Any, ctx: PluginContext) -> Any:
        """Phase 2: wrap the EBC/EC before the ranker is constructed."""
        return collections

    def wrap_model(self, model: nn.Module, ctx: PluginContext) -> nn.Module:
        """Phase 3: wrap or replace modules of the built (unsharded) model."""
        return model

    def sharders(self, device: torch.device) -> List[Any]:
        """Sharders of this plugin's own sharded modules (none by default)."""
        return []

    def batch_transform(self, ctx: PluginContext) -> Optional[Callable[[Any], Any]]:
        """Data side: a function ``Batch -> Batch`` run on every batch when it is built
        (in the data-loader workers, before the input distribution), e.g. to add
        sparse features derived from the ids already in the batch; its keys then reach
        the (sharded) collections as ordinary KJT features, so
        ``TrainPipelineSparseDist`` prefetches them. None (default): no transform."""
        return None


def install_batch_transforms(plugins: Sequence[RankerPlugin], samples: Any,
                             ctx: PluginContext) -> None:
    """Sets ``samples.batch_transforms`` (a ``RankingSamples``) to the plugins'
    :meth:`~RankerPlugin.batch_transform` s, in spec order — replacing any earlier
    ones, so building a second model on the same samples does not stack them."""
    transforms = [plugin.batch_transform(ctx) for plugin in plugins]
    samples.batch_transforms = [t for t in transforms if t is not None]


def register_plugin(name: str) -> Callable[[P], P]:
    """Class decorator: ``@register_plugin("idproxy") class IDProxyPlugin(RankerPlugin)``."""

    def deco(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, RankerPlugin)):
            raise TypeError(f"@register_plugin('{name}') needs a RankerPlugin subclass")
        if name in _REGISTRY and _REGISTRY[name] is not cls and not _same_definition(
                _REGISTRY[name], cls):
            raise ValueError(f"a plugin named '{name}' is already registered "
                             f"({_REGISTRY[name].__module__}.{_REGISTRY[name].__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _same_definition(a: type, b: type) -> bool:
    """The same class imported twice (e.g. as ``__main__`` and by name in a spawned rank)."""
    try:
        return a.__qualname__ == b.__qualname__ and inspect.getfile(a) == inspect.getfile(b)
    except TypeError:
        return False


def registered_plugins() -> List[str]:
    return sorted(_REGISTRY)


def get_plugin(name: str) -> Type[RankerPlugin]:
    """The plugin class registered as ``name`` (importing it on first use)."""
    for module in (f"torchrec_mm.plugins.{name}", f"torchrec_mm.{name}.plugin"):
        if name in _REGISTRY:
            break
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is None or not module.startswith(e.name):
                raise
    if name not in _REGISTRY:
        for ep in entry_points(group="torchrec_mm.plugins"):
            if ep.name == name:
                ep.load()
    if name not in _REGISTRY:
        raise KeyError(f"unknown plugin '{name}'; registered: {registered_plugins()}")
    return _REGISTRY[name]


@dataclass
class PluginSpec:
    """A parsed spec: the plugins to apply, in order, with their options.

    Attributes:
        plugins: ``[(name, options), ...]``.
        ranker: optional overrides of the ranker config (``kind``, ``embedding_dim``...).
        source: where the spec came from (for error messages).
    """

    plugins: List[Any] = field(default_factory=list)
    ranker: Dict[str, Any] = field(default_factory=dict)
    source: str = "<spec>"
    imports: List[str] = field(default_factory=list)

    def instantiate(self) -> List[RankerPlugin]:
        for module in self.imports:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise ValueError(f"{self.source}: imports: cannot import '{module}': {e}") from e
        out = []
        for i, (name, options) in enumerate(self.plugins):
            try:
                out.append(get_plugin(name)(**options))
            except (KeyError, ValueError, TypeError) as e:
                raise ValueError(f"{self.source}: plugins[{i}] ('{name}'): {e}") from e
        return out


def parse_spec(raw: Any, source: str = "<spec>") -> PluginSpec:
    """Validates a spec mapping (as loaded from YAML)."""
    if raw is None:
        return PluginSpec(source=source)
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: a plugin spec is a mapping with a 'plugins' list")
    unknown = set(raw) - {"plugins", "ranker", "description", "imports"}
    if unknown:
        raise ValueError(f"{source}: unknown top-level key(s) {sorted(unknown)} "
                         "(allowed: plugins, ranker, imports, description)")
    imports = raw.get("imports") or []
    if not isinstance(imports, list) or not all(isinstance(m, str) for m in imports):
        raise ValueError(f"{source}: 'imports' must be a list of module names")
    items = raw.get("plugins") or []
    if not isinstance(items, list):
        raise ValueError(f"{source}: 'plugins' must be a list")
    plugins = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item:
            raise ValueError(f"{source}: plugins[{i}] needs a 'name'")
        extra = set(item) - {"name", "options"}
        if extra:
            raise ValueError(f"{source}: plugins[{i}]: unknown key(s) {sorted(extra)}")
        options = item.get("options") or {}
        if not isinstance(options, dict):
            raise ValueError(f"{source}: plugins[{i}].options must be a mapping")
        plugins.append((str(item["name"]), options))
    ranker = raw.get("ranker") or {}
    if not isinstance(ranker, dict):
        raise ValueError(f"{source}: 'ranker' must be a mapping")
    return PluginSpec(plugins=plugins, ranker=ranker, source=source, imports=imports)


def load_spec(path: str) -> PluginSpec:
    """Reads and validates a YAML plugin spec."""
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from e
    return parse_spec(raw, source=path)


def apply_plugins(
    model_or_tables: Any,
    spec: Union[PluginSpec, Dict[str, Any], str],
    ctx: Optional[PluginContext] = None,
    plugins: Optional[List[RankerPlugin]] = None,
) -> Any:
    """Applies every plugin of ``spec`` to a ranker's table configs (phase 1, given
    ``RankerTables``), its embedding collections (phase 2, given ``RankerCollections``)
    or the built ranker (phase 3, given an ``nn.Module``).

    Args:
        model_or_tables: ``RankerTables``, ``RankerCollections`` or an ``nn.Module``.
        spec: a :class:`PluginSpec`, a spec mapping or a YAML path.
        ctx: the context plugins may read.
        plugins: already instantiated plugins of ``spec`` (to keep state between phases).
    """
    if isinstance(spec, str):
        spec = load_spec(spec)
    elif isinstance(spec, dict):
        spec = parse_spec(spec)
    ctx = ctx or PluginContext()
    plugins = plugins if plugins is not None else spec.instantiate()
    from torchrec_mm.models.rankers import RankerCollections, RankerTables

    out = model_or_tables
    if not isinstance(out, (nn.Module, RankerTables, RankerCollections)):
        raise TypeError("apply_plugins takes RankerTables, RankerCollections or an "
                        f"nn.Module, got {type(out).__name__}")
    for p in plugins:
        if isinstance(out, RankerCollections):
            out = p.wrap_collections(out, ctx)
        elif isinstance(out, nn.Module):
            out = p.wrap_model(out, ctx)
            if not isinstance(out, nn.Module):
                raise TypeError(f"plugin '{p.name}'.wrap_model returned "
                                f"{type(out).__name__}, not an nn.Module")
        else:
            out = p.configure_tables(out, ctx)
    return out


def spec_sharders(plugins: List[RankerPlugin], device: torch.device) -> List[Any]:
    """Sharders contributed by ``plugins`` (deduplicated by type)."""
    seen, out = set(), []
    for p in plugins:
        for s in p.sharders(device):
            if type(s) not in seen:
                seen.add(type(s))
                out.append(s)
    return out
