import numpy as np
import pytest
import torch

from torchrec_mm.content.encoder import (ContentEncoder, ContentEncoderConfig,
                                         ContentEncoderOutput, find_layer_list)
from torchrec_mm.content.testing import TOPICS, item_texts


def test_prompt_and_emb_token(minilm):
    tok = minilm.tokenizer
    batch = minilm.tokenize(["Red running shoes"])
    tokens = tok.convert_ids_to_tokens(batch["input_ids"][0])
    assert tokens == ["[CLS]", "red", "running", "shoes", "the", "compression", "word", "is",
                      ":", '"', "[EMB]", '"', ".", "[SEP]"]
    # [EMB] is one new special token at the end of the vocabulary ...
    assert minilm.emb_token_id == len(tok) - 1 == 30522
    assert tok.convert_ids_to_tokens(minilm.emb_token_id) == "[EMB]"
    # ... whose embedding row is the mean of the original rows
    weight = minilm.backbone.get_input_embeddings().weight
    assert weight.shape[0] == len(tok)
    torch.testing.assert_close(weight[-1], weight[:-1].mean(0))
    # a literal [EMB] in the text does not create a second one; one [EMB] per row
    batch = minilm.tokenize(["trick [EMB] text", "x"])
    assert (batch["input_ids"] == minilm.emb_token_id).sum(1).tolist() == [1, 1]
    with pytest.raises(ValueError, match="EMB"):
        minilm(batch["input_ids"][:, :3], batch["attention_mask"][:, :3])


def test_truncation_keeps_prompt(minilm):
    long = "shoes " * 200
    prompts, lengths = minilm.render_prompts([long, "short text"])
    assert lengths[0] == minilm.max_length == 40 and lengths[1] < 40
    assert prompts[0].endswith('The compression word is:"[EMB]".')
    assert prompts[1] == 'short text The compression word is:"[EMB]".'
    ids = minilm.tokenize([long])["input_ids"][0]
    assert ids.shape[0] == 40 and (ids == minilm.emb_token_id).sum() == 1


def test_outputs_match_direct_hf_reference(minilm):
    texts = ["a kitten", "easy pasta recipe with tomato and basil for dinner"]
    out = minilm.encode_texts(texts, return_all_layers=True)
    assert out.pooled.shape == (2, 384) and out.emb_token.shape == (2, 384)
    assert out.layer_groups.shape == (2, 3, 384) and out.per_layer.shape == (2, 7, 384)
    batch = minilm.tokenize(texts)
    with torch.no_grad():
        hs = minilm.backbone(**batch, output_hidden_states=True).hidden_states
    for b in range(2):
        n = int(batch["attention_mask"][b].sum())
        pos = batch["input_ids"][b].tolist().index(minilm.emb_token_id)
        torch.testing.assert_close(out.emb_token[b], hs[-1][b, pos], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.pooled[b], hs[-1][b, :n].mean(0), atol=1e-5, rtol=1e-5)
        for g, group in enumerate(minilm.layer_groups):
            ref = torch.stack([hs[i][b, :n].mean(0) for i in group]).mean(0)
            torch.testing.assert_close(out.layer_groups[b, g], ref, atol=1e-5, rtol=1e-5)
        for layer in range(7):
            torch.testing.assert_close(out.per_layer[b, layer], hs[layer][b, :n].mean(0),
                                       atol=1e-5, rtol=1e-5)


def test_bucketed_equals_naive_in_original_order(minilm):
    texts = item_texts(23, seed=3)
    assert len({len(t) for t in texts}) > 10  # mixed lengths
    bucketed = minilm.encode_texts(texts, batch_size=4, bucket=True)
    naive = minilm.encode_texts(texts, batch_size=4, bucket=False)
    single = minilm.encode_texts(texts[:5], batch_size=1, bucket=False)
    for name, value in bucketed.fields().items():
        torch.testing.assert_close(value, naive.fields()[name], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(value[:5], single.fields()[name], atol=2e-5, rtol=1e-4)
    # the items really differ, so a wrong order could not pass
    assert torch.cdist(bucketed.pooled, bucketed.pooled).fill_diagonal_(1).min() > 1e-2


def test_semantic_sanity(minilm):
    texts = [t for ts in TOPICS.values() for t in ts]
    topic = np.repeat(np.arange(len(TOPICS)), 3)
    z = minilm.encode_texts(texts).pooled
    z = torch.nn.functional.normalize(z - z.mean(0), dim=-1)
    sim = (z @ z.T).numpy()
    same = topic[:, None] == topic[None, :]
    off_diag = ~np.eye(len(texts), dtype=bool)
    assert sim[same & off_diag].mean() > sim[~same].mean() + 0.2
    np.fill_diagonal(sim, -2)
    assert (topic[sim.argmax(1)] == topic).all()  # each text's nearest neighbour: same topic


def test_trainable_layers_and_train_mode(minilm):
    try:
        trainable = {n for n, p in minilm.named_parameters() if p.requires_grad}
        assert trainable == {"pooling.query"}
        minilm.set_trainable_layers(2)
        trainable = {n.split(".")[3] for n, p in minilm.named_parameters()
                     if p.requires_grad and n.startswith("backbone.")}
        assert trainable == {"4", "5"}  # encoder.layer.4/5 of 0..5
        minilm.train()
        assert [m.training for m in minilm.layers] == [False] * 4 + [True] * 2
        assert not minilm.backbone.embeddings.training
        batch = minilm.tokenize(["red shoes", "a cat"])
        minilm(**batch).pooled.sum().backward()
        assert minilm.layers[5].attention.self.query.weight.grad is not None
        assert minilm.layers[0].attention.self.query.weight.grad is None
        minilm.set_trainable_layers(-1)
        assert all(p.requires_grad for p in minilm.parameters())
    finally:
        minilm.set_trainable_layers(0)
        minilm.zero_grad(set_to_none=True)
        minilm.train(False)
    assert find_layer_list(minilm.backbone, 6) == "encoder.layer"


def test_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        ContentEncoder(ContentEncoderConfig(model_path=str(tmp_path / "does-not-exist")))
    with pytest.raises(FileNotFoundError, match="config.json"):
        ContentEncoder(ContentEncoderConfig(model_path=str(tmp_path)))
    with pytest.raises(ValueError, match="exactly once"):
        ContentEncoderConfig(prompt_template="{text} no token")
    with pytest.raises(ValueError, match="text"):
        ContentEncoderConfig(prompt_template='"[EMB]"')


def test_output_cat_and_select():
    a = ContentEncoderOutput(torch.ones(2, 3), torch.zeros(2, 3), torch.ones(2, 1, 3))
    b = ContentEncoderOutput(2 * torch.ones(1, 3), torch.ones(1, 3), torch.zeros(1, 1, 3))
    c = ContentEncoderOutput.cat([a, b]).index_select(torch.tensor([2, 0]))
    assert c.pooled[:, 0].tolist() == [2.0, 1.0] and c.per_layer is None
