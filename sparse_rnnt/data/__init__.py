"""Data: corpus synthesis, the MLS reader, manifests, features, tokenizer and batch samplers."""
