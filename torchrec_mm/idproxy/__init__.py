"""IDProxy (Xiaohongshu): content proxies aligned to the ranker's item-ID embeddings,
injected into the item-ID slots (paper ``000_ab5ad86b392685c5``)."""
