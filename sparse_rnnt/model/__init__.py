"""Model: named configs -> torchaudio Emformer RNN-T, loss, decoding."""

from .configs import MODEL_SIZES, ModelConfig, model_config
from .rnnt import EmformerRNNT, build_model, count_parameters

__all__ = ["MODEL_SIZES", "EmformerRNNT", "ModelConfig", "build_model", "count_parameters", "model_config"]
