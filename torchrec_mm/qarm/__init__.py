"""QARM (Kuaishou): aligned content representations as learnable VQ/RQ codes and
target-aware code-matching sequences. Paper ``002_93e7adf76829e098``."""
