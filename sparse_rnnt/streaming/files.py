"""Stream audio files through an exported artifact, chunk by chunk (``sparse-rnnt stream``)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from ..data.audio import SAMPLE_RATE, audio_info, load_audio
from ..errors import UserError
from .stream import PartialResult, StreamingDecoder, StreamResult


def read_wave(path: str | os.PathLike[str]) -> torch.Tensor:
    """Mono float32 ``[T]`` at 16 kHz from FLAC/WAV/Opus (resampled if needed); any length,
    none included (a stream that short decodes to an empty hypothesis).

    Raises :class:`~sparse_rnnt.data.audio.AudioError` (a :class:`UserError` naming the file)
    for a missing or unreadable file or NaN/Inf samples."""
    rate = audio_info(path).sample_rate
    wave = load_audio(path, expected_rate=None, allow_empty=True)
    if rate != SAMPLE_RATE and wave.numel():
        import torchaudio.functional as AF

        wave = AF.resample(wave, rate, SAMPLE_RATE)
    return wave


def stream_files(
    artifact_dir: str | os.PathLike[str],
    paths: list[str],
    *,
    language: str | None = None,
    piece_ms: float = 160.0,
    device: str = "cpu",
    on_partial: Callable[[str, PartialResult], None] | None = None,
    decoding: str = "greedy",
    beam_width: int = 4,
    cuda_graphs: bool = False,
    semi_structured: str = "auto",
) -> tuple[list[StreamResult], dict[str, float]]:
    """Feed each file in ``piece_ms`` pieces as if it arrived live; returns the results and the
    latency statistics (p50/p99 per chunk step, RTF) of all steps. ``decoding``: ``greedy`` or
    ``beam`` (torchaudio's RNN-T beam search of width ``beam_width``, continued chunk by chunk).
    ``cuda_graphs``: replay the encoder step as CUDA graphs (CUDA, single-pathway use only).
    ``semi_structured``: torch's backend for 2:4 layers (see :func:`~sparse_rnnt.export.load_artifact`)."""
    from ..export import load_artifact
    from ..export.formats import SEMI_STRUCTURED

    if piece_ms <= 0:
        raise UserError(f"--chunk-ms must be positive, got {piece_ms}")
    if decoding not in ("greedy", "beam"):
        raise UserError(f"--decoding must be greedy or beam, got {decoding!r}")
    if beam_width < 1:
        raise UserError(f"--beam-width must be at least 1, got {beam_width}")
    if cuda_graphs and not str(device).startswith("cuda"):
        raise UserError(f"--cuda-graphs needs --device cuda (got {device})")
    if semi_structured not in SEMI_STRUCTURED:
        raise UserError(f"--semi-structured must be one of {', '.join(SEMI_STRUCTURED)}, got {semi_structured!r}")
    waves = [read_wave(p) for p in paths]  # all files are checked before any decoding
    art = load_artifact(artifact_dir, device=device, semi_structured=semi_structured)
    if language is None:
        if art.multilingual:
            raise UserError(f"this artifact holds several pathways: pass --language ({', '.join(art.languages)})")
        language = art.languages[0] if art.languages else None
    elif language not in art.languages:
        raise UserError(f"the artifact has no pathway for {language!r} (it has {', '.join(art.languages)})")
    if cuda_graphs and art.multilingual:
        raise UserError("--cuda-graphs needs a single-language artifact (a graph cannot switch pathways)")
    decoder = StreamingDecoder.from_artifact(art, decoding=decoding, beam_width=beam_width,
                                             step_mode="cuda-graph" if cuda_graphs else "eager")
    piece = max(1, round(SAMPLE_RATE * piece_ms / 1000))
    results = []
    for path, wave in zip(paths, waves, strict=True):
        s = decoder.open(language=language, stream_id=str(path))
        for start in range(0, wave.numel(), piece):
            for part in decoder.feed(s, wave[start:start + piece]):
                if on_partial is not None:
                    on_partial(str(path), part)
        results.append(decoder.finalize(s))
    return results, decoder.latency_stats()
