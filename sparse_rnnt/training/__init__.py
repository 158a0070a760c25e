"""Training: configs, trainer loop, checkpoints, metrics, evaluation."""
