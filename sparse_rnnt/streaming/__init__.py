"""Streaming (chunk-by-chunk) recognition with the Emformer RNN-T, one or many streams."""

from .encoder import (
    EncoderGeometry,
    EncoderState,
    encoder_step,
    encoder_step_tensors,
    geometry,
    initial_state,
)
from .features import StreamingLogMel
from .graphs import StaticEncoderStep, StaticGreedyDecoder
from .pool import StatePool
from .stream import (
    PartialResult,
    StepTiming,
    Stream,
    StreamingDecoder,
    StreamResult,
    iter_pieces,
    percentile,
)

__all__ = [
    "EncoderGeometry",
    "EncoderState",
    "PartialResult",
    "StatePool",
    "StaticEncoderStep",
    "StaticGreedyDecoder",
    "StepTiming",
    "Stream",
    "StreamResult",
    "StreamingDecoder",
    "StreamingLogMel",
    "encoder_step",
    "encoder_step_tensors",
    "geometry",
    "initial_state",
    "iter_pieces",
    "percentile",
]
