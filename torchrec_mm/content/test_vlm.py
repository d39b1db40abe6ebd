"""The image path, on a tiny random LLaVA-style model, and a decoder-only text model."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from torchrec_mm.content.encoder import ContentEncoder, ContentEncoderConfig


def _image(seed, size=40):
    rgb = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(rgb)


@pytest.fixture(scope="module")
def llava(tiny_models):
    return ContentEncoder(ContentEncoderConfig(model_path=tiny_models["llava"], max_length=24))


def test_vlm_prompt_has_image_tokens(llava):
    assert llava.is_multimodal and llava.image_prompt == "<image>"
    assert type(llava.backbone).__name__ == "LlavaModel"
    assert llava._layer_list_name == "language_model.layers" and llava.num_layers == 4
    batch = llava.tokenize(["a red shoe", "a blue dog"], [_image(0), None])
    image_id = llava.tokenizer.convert_tokens_to_ids("<image>")
    # 32x32 image, 8x8 patches -> 16 image tokens, only in the row with an image
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [16, 0]
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert (batch["input_ids"] == llava.emb_token_id).sum(1).tolist() == [1, 1]


def test_vlm_shapes_and_image_changes_output(llava, tmp_path):
    path = str(tmp_path / "b.png")
    _image(2).save(path)
    texts = ["a red shoe", "a red shoe", "a red shoe", "a blue dog and the cat"]
    out = llava.encode_texts(texts, [_image(1), path, None, _image(1)], batch_size=3,
                             return_all_layers=True)
    assert out.pooled.shape == (4, 32) and out.emb_token.shape == (4, 32)
    assert out.layer_groups.shape == (4, 3, 32) and out.per_layer.shape == (4, 5, 32)
    assert torch.isfinite(out.pooled).all()
    # the image changes every output; a different image gives a different result
    for field in ("pooled", "emb_token"):
        value = getattr(out, field)
        assert (value[0] - value[1]).abs().max() > 1e-3
        assert (value[0] - value[2]).abs().max() > 1e-3
    # same item encoded alone (PIL vs path, with/without bucketing) -> same vectors
    alone = llava.encode_texts(["a red shoe"], [_image(2)])
    torch.testing.assert_close(alone.pooled[0], out.pooled[1], atol=1e-5, rtol=1e-4)
    text_only = llava.encode_texts(["a red shoe"])
    torch.testing.assert_close(text_only.pooled[0], out.pooled[2], atol=1e-5, rtol=1e-4)
    naive = llava.encode_texts(texts, [_image(1), path, None, _image(1)], batch_size=3,
                               bucket=False)
    torch.testing.assert_close(naive.layer_groups, out.layer_groups, atol=1e-5, rtol=1e-4)


def test_vlm_trainable_layers_skip_vision_tower(llava):
    try:
        llava.set_trainable_layers(1)
        names = {n for n, p in llava.named_parameters() if p.requires_grad}
        assert names and all(n.startswith(("backbone.language_model.layers.3.",
                                           "backbone.language_model.norm.", "pooling."))
                             for n in names)
        assert "backbone.language_model.norm.weight" in names
    finally:
        llava.set_trainable_layers(0)


def test_decoder_text_model_and_save_roundtrip(tiny_models, tmp_path):
    enc = ContentEncoder(ContentEncoderConfig(model_path=tiny_models["llama"], max_length=16))
    assert enc._layer_list_name == "layers" and not enc.is_multimodal
    assert enc.tokenizer.padding_side == "right"
    texts = ["a red shoe", "the cat and the dog " * 8, "pizza"]
    out = enc.encode_texts(texts, batch_size=3, bucket=False)
    single = enc.encode_texts(texts, batch_size=1)
    torch.testing.assert_close(out.emb_token, single.emb_token, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.pooled, single.pooled, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="text-only"):
        enc.encode_texts(["a"], [_image(0)])
    # a trained pooling query and the [EMB] vocabulary survive save/load
    with torch.no_grad():
        enc.pooling.query.normal_()
    trained = enc.encode_texts(texts)
    assert (trained.pooled - out.pooled).abs().max() > 1e-4
    enc.save_pretrained(str(tmp_path / "saved"))
    again = ContentEncoder.from_pretrained(str(tmp_path / "saved"))
    assert again.emb_token_id == enc.emb_token_id and again.config.max_length == 16
    torch.testing.assert_close(again.encode_texts(texts).pooled, trained.pooled)


def test_vlm_encode_job_with_image_paths(llava, tmp_path):
    from torchrec_mm.content.encode_job import encode_items
    from torchrec_mm.content.store import ContentStore
    from torchrec_mm.content.testing import write_items
    from torchrec_mm.data.schema import DataError

    data = str(tmp_path / "data")
    os.makedirs(os.path.join(data, "img"))
    for i in range(2):
        _image(10 + i).save(os.path.join(data, "img", f"{i}.png"))
    texts = ["a red shoe", "a red shoe", "a blue dog", "the cat"]
    write_items(data, texts, image_paths=["img/0.png", "img/1.png", None, "img/0.png"])
    out = str(tmp_path / "out")
    encode_items(data, out, encoder=llava, batch_size=2, chunk_size=3, group_sample=4,
                 progress=False)
    store = ContentStore(out)
    want = llava.encode_texts(texts, [_image(10), _image(11), None, _image(10)])
    torch.testing.assert_close(store.get(torch.arange(4)), want.pooled, atol=2e-3, rtol=2e-3)
    assert (store.get(torch.tensor([0]))[0] - store.get(torch.tensor([1]))[0]).abs().max() > 1e-3
    write_items(data, texts, image_paths=["img/0.png", "img/missing.png", None, None])
    with pytest.raises(DataError, match=r"record 1, field 'image_path'.*missing.png"):
        encode_items(data, str(tmp_path / "out2"), encoder=llava, progress=False)
