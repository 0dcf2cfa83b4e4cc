"""largemodel: serve one large language model across many GPUs and nodes."""

__version__ = "0.1.0"
