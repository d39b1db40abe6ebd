"""The online path's item store: item id → proxies / codes with a version per record,
an embedded default (memory-mapped files, no server), SQLite and Redis backends.

Typical use::

    from torchrec_mm.serving import ItemStore, StoreSchema
    schema = StoreSchema.of(p_coarse=("float32", (64,)), z_groups=("float16", (3, 384)))
    with ItemStore.open("out/item_store", schema) as store:          # or redis://host:port
        store.put(new_ids, {"p_coarse": p, "z_groups": z}, version="idproxy@run-7")
        values, found = store.get(batch_ids, ["p_coarse"])           # [B, 64], [B]
"""

from torchrec_mm.serving.schema import (  # noqa: F401
    FieldSpec,
    SchemaMismatchError,
    StoreSchema,
    StoreUnavailableError,
)
from torchrec_mm.serving.redis_backend import RetryConfig  # noqa: F401  (redis: lazy)
from torchrec_mm.serving.store import BACKENDS, ItemStore, resolve_backend  # noqa: F401
