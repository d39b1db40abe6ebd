"""The canonical torchrec-mm dataset format (version 1).

A dataset is a directory::

    DIR/
      meta.json                  # DatasetMeta: name, scenarios, action names, counts
      items.parquet              # one row per item (ITEM_SCHEMA)
      users.parquet              # one row per user (USER_SCHEMA + optional attr_* columns)
      interactions/              # one or more parquet parts (INTERACTION_SCHEMA),
        part-00000.parquet       #   each sorted by (user_id, timestamp)
      split.json                 # optional: the cold-start / time split (see split.py)

IDs are dense ``int64`` in ``[0, num_items)`` / ``[0, num_users)``, so they index
embedding tables directly; the original identifiers are kept in ``raw_id``.
``scenario`` is a string that must be one of ``meta.scenarios``. ``actions`` is an
``int64`` bit mask: bit ``k`` set means action ``meta.actions[k]`` happened
(e.g. ``is_like``). ``label`` is the click label used by the rankers.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa

FORMAT_VERSION = "torchrec-mm/v1"

META_FILE = "meta.json"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
INTERACTIONS_DIR = "interactions"
SPLIT_FILE = "split.json"

INTERACTION_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("scenario", pa.string(), nullable=False),
        pa.field("actions", pa.int64(), nullable=False),
        pa.field("duration", pa.float32(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
    ]
)

ITEM_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("raw_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("image_path", pa.string(), nullable=True),
    ]
)

# users.parquet may carry extra categorical attribute columns named ``attr_<name>``
# (int64, dense ids starting at 0); they become sparse user features of the rankers.
USER_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("raw_id", pa.string(), nullable=False),
    ]
)
USER_ATTR_PREFIX = "attr_"

# The compact in-memory form of the interaction columns
# (``io.load_interaction_columns``, used by the batcher): ``scenario`` becomes an
# index into ``DatasetMeta.scenarios``.
NUMPY_DTYPES: Dict[str, Any] = {
    "user_id": np.int64,
    "item_id": np.int64,
    "scenario": np.int16,
    "actions": np.int64,
    "duration": np.float32,
    "timestamp": np.int64,
    "label": np.int8,
}

# By convention action bit 0 is the click (``label``) in every built-in importer.
CLICK_ACTION = "is_click"
# ``actions`` is a signed int64: at most 63 action bits.
MAX_ACTIONS = 63


class DataError(ValueError):
    """A record of a dataset file is invalid.

    The message always names the file, the record (row number or line) and the field.
    """

    def __init__(
        self,
        path: str,
        record: Any,
        field_name: Optional[str],
        message: str,
    ) -> None:
        self.path = str(path)
        self.record = record
        self.field = field_name
        self.reason = message
        where = f"{self.path}: record {record}"
        if field_name is not None:
            where += f", field '{field_name}'"
        super().__init__(f"{where}: {message}")


@dataclass
class DatasetMeta:
    """Contents of ``meta.json``.

    Attributes:
        name: human-readable dataset name.
        scenarios: allowed values of ``interactions.scenario``, in a fixed order
            (the order defines scenario indices used by models).
        actions: names of the action bits of ``interactions.actions``.
        num_users / num_items / num_interactions: counts.
        user_attrs: ``{attr column name: cardinality}`` of users.parquet attributes.
        source: free-form provenance (importer, source path, generator config).
    """

    name: str
    scenarios: List[str]
    actions: List[str]
    num_users: int
    num_items: int
    num_interactions: int
    user_attrs: Dict[str, int] = field(default_factory=dict)
    source: Dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_VERSION

    def scenario_index(self) -> Dict[str, int]:
        return {s: i for i, s in enumerate(self.scenarios)}

    def action_bit(self, name: str) -> int:
        """Bit mask of action ``name`` in ``interactions.actions``."""
        try:
            return 1 << self.actions.index(name)
        except ValueError:
            raise KeyError(
                f"unknown action '{name}'; this dataset has {self.actions}"
            ) from None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @staticmethod
    def load(data_dir: str) -> "DatasetMeta":
        path = os.path.join(data_dir, META_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} not found: '{data_dir}' is not a torchrec-mm dataset "
                "directory (create one with `torchrec-mm data synth` or `data import`)"
            )
        with open(path) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(path, f"line {e.lineno}", None, f"invalid JSON: {e.msg}")
        known = {f.name for f in dataclasses.fields(DatasetMeta)}
        for key in ("name", "scenarios", "actions", "num_users", "num_items",
                    "num_interactions"):
            if key not in raw:
                raise DataError(path, 0, key, "missing required key")
        if raw.get("format", FORMAT_VERSION) != FORMAT_VERSION:
            raise DataError(path, 0, "format",
                            f"unsupported format {raw['format']!r}, expected {FORMAT_VERSION!r}")
        return DatasetMeta(**{k: v for k, v in raw.items() if k in known})
