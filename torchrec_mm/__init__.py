"""torchrec-mm: multimodal (M)LLM item content for TorchRec ranking and retrieval stacks."""

__version__ = "0.1.0"
