"""Tiny randomly initialised Hugging Face checkpoints for tests (no downloads).

``build_tiny_llava(dir)`` writes a LLaVA-style vision-language model (tiny CLIP vision
tower + tiny Llama language model) with its processor; ``build_tiny_llama(dir)`` a
decoder-only text model. Both use a word-level tokenizer built with ``tokenizers``
over :data:`VOCAB_WORDS`; unknown words map to ``<unk>``. ``item_texts`` and
``write_items`` make small datasets for the encode job.
"""

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

VOCAB_WORDS: List[str] = (
    "the a an of and to in is on for with at by from this that it as are be "
    "red blue green black white small large new old soft hard fast slow "
    "shoe shoes dress shirt phone laptop camera cat cats dog dogs kitten puppy bag watch "
    "running marathon football soccer goal match team player coach sport "
    "recipe pasta pizza bake cake sugar flour oven cook dinner kitchen "
    "compression word photo picture video review price buy cheap best"
).split()
_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
_PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _vocab() -> Dict[str, int]:
    words = _SPECIALS + VOCAB_WORDS + [p for p in _PUNCT]
    return {w: i for i, w in enumerate(dict.fromkeys(words))}


def build_tiny_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """Word-level tokenizer that lower-cases, splits on whitespace and punctuation
    and prepends ``<s>``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = _vocab()
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


def _llama_config(vocab_size: int, num_layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=num_layers, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=0, bos_token_id=2, eos_token_id=3)


def build_tiny_llama(path: str, num_layers: int = 4, seed: int = 0) -> str:
    """Saves a tiny random ``LlamaForCausalLM`` + tokenizer to ``path``."""
    from transformers import LlamaForCausalLM

    tok = build_tiny_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(len(tok), num_layers))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def build_tiny_llava(path: str, num_layers: int = 4, image_size: int = 32,
                     patch_size: int = 8, seed: int = 0) -> str:
    """Saves a tiny random ``LlavaForConditionalGeneration`` (CLIP vision tower,
    Llama text model) + ``LlavaProcessor`` to ``path``. Each image becomes
    ``(image_size / patch_size) ** 2`` image tokens."""
    import transformers
    from transformers import (CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    # without torchvision, transformers 5 falls back to (and warns about) the PIL backend
    image_processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or \
        transformers.CLIPImageProcessor

    tok = build_tiny_tokenizer()
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size,
                              patch_size=patch_size, projection_dim=16)
    config = LlavaConfig(vision_config=vision, text_config=_llama_config(len(tok), num_layers),
                         image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    image_processor = image_processor_cls(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok,
                               patch_size=patch_size, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, image_token="<image>")
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


TOPICS = {
    "running": ["running shoes for marathon training", "trail sneakers for long runs",
                "a fast runner wins the city marathon"],
    "cooking": ["easy pasta recipe with tomato and basil", "bake a soft chocolate cake",
                "dinner ideas for a small kitchen"],
    "pets": ["cute kitten playing with yarn", "my puppy learns to fetch",
             "the cat sleeps on the sofa all day"],
}


def item_texts(n: int, seed: int = 0) -> List[str]:
    """N item texts of mixed lengths (1..60 words) over a few topics."""
    rng = np.random.default_rng(seed)
    pool = [t for ts in TOPICS.values() for t in ts]
    words = " ".join(pool).split()
    lengths = np.minimum(rng.lognormal(2.0, 0.9, n).astype(int) + 1, 60)
    return [f"item {i}: {pool[i % len(pool)]} " + " ".join(rng.choice(words, size=k))
            for i, k in enumerate(lengths)]


def write_items(data_dir: str, texts: Sequence[str], item_ids: Optional[Sequence[int]] = None,
                image_paths: Optional[Sequence[Optional[str]]] = None) -> str:
    """Writes ``DIR/items.parquet`` (ITEM_SCHEMA)."""
    from torchrec_mm.data.schema import ITEM_SCHEMA

    os.makedirs(data_dir, exist_ok=True)
    ids = np.arange(len(texts)) if item_ids is None else np.asarray(item_ids)
    table = pa.table({"item_id": pa.array(ids, pa.int64()),
                      "raw_id": [f"raw{i}" for i in ids],
                      "text": list(texts),
                      "image_path": image_paths or [None] * len(texts)}, schema=ITEM_SCHEMA)
    pq.write_table(table, os.path.join(data_dir, "items.parquet"))
    return data_dir
