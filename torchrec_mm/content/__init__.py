"""Item content encoding: a Hugging Face (vision-)language model read through the
IDProxy prompt with an ``[EMB]`` token, attention pooling ``g(H)``, shallow → deep
layer groups, the resumable sharded encode job and the store that reads its output.

Typical use::

    from torchrec_mm.content import ContentEncoder, ContentEncoderConfig, ContentStore
    enc = ContentEncoder(ContentEncoderConfig())          # MiniLM by default
    out = enc.encode_texts(["red running shoes"])          # pooled / emb_token / layer_groups
    encode_items("data/synth", "out/content")              # or `torchrec-mm encode`
    store = ContentStore("out/content"); store.get(item_ids, "layer_groups")
"""

from torchrec_mm.content.encode_job import encode_items, read_items  # noqa: F401
from torchrec_mm.content.encoder import (  # noqa: F401
    DEFAULT_PROMPT,
    ContentEncoder,
    ContentEncoderConfig,
    ContentEncoderOutput,
    default_model_path,
)
from torchrec_mm.content.layer_groups import group_layers, layer_similarity  # noqa: F401
from torchrec_mm.content.pooling import AttentionPooling  # noqa: F401
from torchrec_mm.content.store import ContentStore, MissingItemError  # noqa: F401
