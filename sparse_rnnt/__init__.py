"""sparse_rnnt: prune, train, export and stream sparse multilingual Emformer RNN-T recognizers."""

__version__ = "0.1.0"
