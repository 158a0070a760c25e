"""Named Emformer RNN-T sizes.

``base`` is torchaudio's ``emformer_rnnt_base`` (76.7M parameters with 4097 symbols). ``paper-56m``
and ``paper-187m`` are sized like the monolingual and multilingual models of Xie et al. (2024); the
paper does not give their exact shapes, so these are our Emformer shapes with those parameter
counts (54.2M and 184.3M at 4097 symbols). The count printed at build time depends on the
tokenizer's vocabulary size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import UserError

# What torchaudio's Emformer accepts (its None, no scaling, has no place in a str field).
WEIGHT_INIT_SCALE_STRATEGIES: tuple[str, ...] = ("depthwise", "constant")


@dataclass(frozen=True)
class ModelConfig:
    """Arguments of ``torchaudio.models.emformer_rnnt_model`` (``num_symbols`` comes from the tokenizer).

    Transformer width is ``time_reduction_input_dim * time_reduction_stride``. ``segment_length``
    and ``right_context_length`` count 10 ms input frames (16 -> 160 ms chunks).
    """

    name: str = "tiny"
    input_dim: int = 80
    encoding_dim: int = 256
    segment_length: int = 16
    right_context_length: int = 4
    time_reduction_input_dim: int = 36
    time_reduction_stride: int = 4
    transformer_num_heads: int = 4
    transformer_ffn_dim: int = 576
    transformer_num_layers: int = 4
    transformer_dropout: float = 0.1
    transformer_activation: str = "gelu"
    transformer_left_context_length: int = 30
    transformer_max_memory_size: int = 0
    transformer_weight_init_scale_strategy: str = "depthwise"
    transformer_tanh_on_mem: bool = True
    symbol_embedding_dim: int = 128
    num_lstm_layers: int = 1
    lstm_layer_norm: bool = True
    lstm_layer_norm_epsilon: float = 1e-3
    lstm_dropout: float = 0.1
    # Weight of an auxiliary CTC loss on the encoder output (0 disables the CTC head).
    ctc_weight: float = 0.0

    @property
    def width(self) -> int:
        return self.time_reduction_input_dim * self.time_reduction_stride

    def validate(self) -> None:
        positive = (
            "input_dim", "encoding_dim", "segment_length", "time_reduction_input_dim",
            "time_reduction_stride", "transformer_num_heads", "transformer_ffn_dim",
            "transformer_num_layers", "symbol_embedding_dim", "num_lstm_layers",
        )
        for key in positive:
            if getattr(self, key) <= 0:
                raise UserError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.width % self.transformer_num_heads:
            raise UserError(
                f"model: width {self.width} (time_reduction_input_dim x stride) is not divisible "
                f"by transformer_num_heads={self.transformer_num_heads}"
            )
        if self.segment_length % self.time_reduction_stride or self.right_context_length % self.time_reduction_stride:
            raise UserError("model: segment_length and right_context_length must be multiples of time_reduction_stride")
        if self.transformer_weight_init_scale_strategy not in WEIGHT_INIT_SCALE_STRATEGIES:
            raise UserError(
                "model.transformer_weight_init_scale_strategy must be "
                f"{' or '.join(WEIGHT_INIT_SCALE_STRATEGIES)}, got {self.transformer_weight_init_scale_strategy!r}"
            )
        if self.transformer_activation not in ("relu", "gelu", "silu"):
            raise UserError(f"model.transformer_activation must be relu, gelu or silu, got {self.transformer_activation!r}")
        for key in ("transformer_dropout", "lstm_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise UserError(f"model.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.ctc_weight < 0:
            raise UserError(f"model.ctc_weight must be >= 0, got {self.ctc_weight}")


MODEL_SIZES: dict[str, ModelConfig] = {
    # ~1.2M with a character vocabulary: CPU demo and tests.
    "tiny": ModelConfig(),
    # ~19.7M at 1025 symbols.
    "small": ModelConfig(
        name="small", encoding_dim=512, time_reduction_input_dim=96, transformer_num_heads=8,
        transformer_ffn_dim=1536, transformer_num_layers=9, symbol_embedding_dim=384,
        num_lstm_layers=2, lstm_dropout=0.3,
    ),
    # torchaudio's emformer_rnnt_base: 76.7M at 4097 symbols.
    "base": ModelConfig(
        name="base", encoding_dim=1024, time_reduction_input_dim=128, transformer_num_heads=8,
        transformer_ffn_dim=2048, transformer_num_layers=20, symbol_embedding_dim=512,
        num_lstm_layers=3, lstm_dropout=0.3,
    ),
    "paper-56m": ModelConfig(
        name="paper-56m", encoding_dim=768, time_reduction_input_dim=128, transformer_num_heads=8,
        transformer_ffn_dim=2048, transformer_num_layers=13, symbol_embedding_dim=640,
        num_lstm_layers=2, lstm_dropout=0.3,
    ),
    "paper-187m": ModelConfig(
        name="paper-187m", encoding_dim=1024, time_reduction_input_dim=192, transformer_num_heads=12,
        transformer_ffn_dim=3072, transformer_num_layers=21, symbol_embedding_dim=1024,
        num_lstm_layers=3, lstm_dropout=0.3,
    ),
}


def model_config(name: str, **overrides: object) -> ModelConfig:
    """A named size with field overrides, validated."""
    if name not in MODEL_SIZES:
        raise UserError(f"unknown model size {name!r}: choose from {', '.join(MODEL_SIZES)}")
    base = MODEL_SIZES[name]
    valid = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in overrides:
        if key not in valid:
            raise UserError(f"unknown model option {key!r}")
    cfg = dataclasses.replace(base, **overrides)  # type: ignore[arg-type]
    cfg.validate()
    return cfg
