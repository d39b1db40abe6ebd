"""Shared fixtures of the content tests: one MiniLM encoder per session (tests that
change its state restore it) and tiny randomly initialised HF checkpoints."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm():
    from torchrec_mm.content.encoder import ContentEncoder, ContentEncoderConfig

    return ContentEncoder(ContentEncoderConfig(max_length=40))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from torchrec_mm.content.testing import build_tiny_llama, build_tiny_llava

    root = tmp_path_factory.mktemp("tiny_models")
    return {"llava": build_tiny_llava(str(root / "llava")),
            "llama": build_tiny_llama(str(root / "llama"))}
