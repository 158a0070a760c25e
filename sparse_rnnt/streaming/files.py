"""Stream audio files through an exported artifact, chunk by chunk (``sparse-rnnt stream``).

Files are resampled to the artifact's ``features.sample_rate`` (the rate its model was trained
on), so the front end, the reported durations and the RTF all use that rate.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch

from ..data.audio import SAMPLE_RATE, AudioError, audio_info, load_audio
from ..errors import UserError
from .stream import PartialResult, StreamingDecoder, StreamResult

# How sparse layers run: their format's kernels, or each one timed against its dense weight.
LAYER_RUNTIMES = ("kernels", "auto")
MAX_RESAMPLE_RATIO = 1000
MAX_PIECE_MS = 3_600_000.0  # a whole hour per tick: far past any real use, and its sample count stays an int


def _read_native(path: str | os.PathLike[str]) -> tuple[torch.Tensor, int]:
    """Mono float32 ``[T]`` at the file's own rate, and that rate (see :func:`read_wave`)."""
    rate = audio_info(path).sample_rate
    return load_audio(path, expected_rate=None, allow_empty=True), rate


def _resample(wave: torch.Tensor, rate: int, sample_rate: int) -> torch.Tensor:
    """``wave [T]`` at ``rate`` -> ``[T']`` at ``sample_rate`` (unchanged when equal or empty)."""
    if rate == sample_rate or not wave.numel():
        return wave
    import torchaudio.functional as AF

    return AF.resample(wave, rate, sample_rate)


def read_wave(path: str | os.PathLike[str], sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Mono float32 ``[T]`` at ``sample_rate`` Hz from FLAC/WAV/Opus (resampled if needed); any
    length, none included (a stream that short decodes to an empty hypothesis).

    Raises :class:`~sparse_rnnt.data.audio.AudioError` (a :class:`UserError` naming the file)
    for a missing or unreadable file, NaN/Inf or out-of-range samples, or a rate whose ratio to
    ``sample_rate`` does not reduce below ``MAX_RESAMPLE_RATIO`` (16001 Hz, say)."""
    wave, rate = _read_native(path)
    _check_rate(path, rate, sample_rate)
    return _resample(wave, rate, sample_rate)


def _check_rate(path: str | os.PathLike[str], rate: int, sample_rate: int) -> None:
    """:class:`AudioError` unless ``rate`` resamples to ``sample_rate`` at a bounded cost."""
    if rate == sample_rate:
        return
    # torchaudio's resampling kernel has about rate/g x sample_rate/g taps: streaming one second of
    # 16001 Hz audio peaked at 4.7 GB (0.66 GB at 16 kHz). Usual rates (8k ... 192k, 11025, 44100 ...) reduce far below this.
    g = math.gcd(rate, sample_rate)
    if max(rate, sample_rate) // g > MAX_RESAMPLE_RATIO:
        raise AudioError(f"{path}: sample rate {rate} Hz cannot be resampled to {sample_rate} Hz at a bounded "
                         f"cost (their ratio reduces to {rate // g}:{sample_rate // g}); convert the file to "
                         f"{sample_rate} Hz first", path)


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
    layer_runtime: str = "kernels",
    cpu_sparse: str = "auto",
) -> tuple[list[StreamResult], dict[str, float]]:
    """Feed each file in ``piece_ms`` pieces as if it arrived live; returns the results and the
    decoder's :meth:`~StreamingDecoder.latency_stats` (p50/p99 per chunk step; ``rtf`` =
    ``compute_s_per_audio_s``, all files' compute over all their audio). Audio is resampled to the
    artifact's ``features.sample_rate``, and ``audio_s``/RTF are in seconds of that audio.
    ``decoding``: ``greedy`` or ``beam`` (torchaudio's RNN-T beam search of width ``beam_width``,
    continued chunk by chunk). ``cuda_graphs``: replay the encoder step as CUDA graphs (CUDA,
    single-pathway use only). ``semi_structured``: torch's backend for 2:4 layers (see
    :func:`~sparse_rnnt.export.load_artifact`); ``cpu_sparse``: how bsr/bitmap layers run on
    the CPU (``auto``, ``kernel`` or ``dense``, as there). ``layer_runtime``: ``"kernels"`` runs every
    sparse layer on its format's kernel; ``"auto"`` times each one against its dense weight at
    one stream's shapes and keeps the faster (:mod:`~sparse_rnnt.export.autoselect`;
    single-pathway artifacts). The statistics then also hold ``layers_sparse``,
    ``layers_dense_auto`` and ``auto_extra_bytes``."""
    from ..export import load_artifact
    from ..export.formats import CPU_SPARSE, SEMI_STRUCTURED

    if not math.isfinite(piece_ms) or not 0 < piece_ms <= MAX_PIECE_MS:
        raise UserError(f"--chunk-ms must be a positive number of at most {MAX_PIECE_MS:.0f} (an hour), "
                        f"got {piece_ms}")
    if decoding not in ("greedy", "beam"):
        raise UserError(f"--decoding must be greedy or beam, got {decoding!r}")
    if beam_width < 1:
        raise UserError(f"--beam-width must be at least 1, got {beam_width}")
    if cuda_graphs and not str(device).startswith("cuda"):
        raise UserError(f"--cuda-graphs needs --device cuda (got {device})")
    if layer_runtime not in LAYER_RUNTIMES:
        raise UserError(f"--layer-runtime must be one of {', '.join(LAYER_RUNTIMES)}, got {layer_runtime!r}")
    if semi_structured not in SEMI_STRUCTURED:
        raise UserError(f"--semi-structured must be one of {', '.join(SEMI_STRUCTURED)}, got {semi_structured!r}")
    if cpu_sparse not in CPU_SPARSE:
        raise UserError(f"--cpu-sparse must be one of {', '.join(CPU_SPARSE)}, got {cpu_sparse!r}")
    # All files are read (checked) before any decoding; resampled once the artifact's rate is known.
    native = [_read_native(p) for p in paths]
    art = load_artifact(artifact_dir, device=device, semi_structured=semi_structured, cpu_sparse=cpu_sparse)
    for path, (_, file_rate) in zip(paths, native, strict=True):
        _check_rate(path, file_rate, art.features.sample_rate)
    if language is None:
        if art.multilingual:
            raise UserError(f"this artifact holds several pathways: pass --language ({', '.join(art.languages)})")
        language = art.languages[0] if art.languages else None
    elif language not in art.languages:
        raise UserError(f"the artifact has no pathway for {language!r} (it has {', '.join(art.languages)})")
    if cuda_graphs and art.multilingual:
        raise UserError("--cuda-graphs needs a single-language artifact (a graph cannot switch pathways)")
    auto: dict[str, float] = {}
    if layer_runtime == "auto":
        if art.multilingual:
            raise UserError("--layer-runtime auto needs a single-language artifact (its layers are masked "
                            "kernels shared by every pathway)")
        from ..export.autoselect import choose_layer_runtimes, probe_rows, summarize

        rows = probe_rows(art.model, (1,), decoding=decoding, beam_width=beam_width)  # the shapes it will see
        # Timed as the stream will run them: graph replays, or eager calls that pay their launches.
        chosen = summarize(choose_layer_runtimes(art.model, rows, graphs=cuda_graphs))
        auto = {k: float(v) for k, v in chosen.items() if k != "auto_runtimes"}
    decoder = StreamingDecoder.from_artifact(art, decoding=decoding, beam_width=beam_width,
                                             step_mode="cuda-graph" if cuda_graphs else "eager")
    rate = art.features.sample_rate
    piece = max(1, round(rate * piece_ms / 1000))
    results = []
    for path, (wave, file_rate) in zip(paths, native, strict=True):
        wave = _resample(wave, file_rate, rate)
        s = decoder.open(language=language, stream_id=str(path))
        for start in range(0, wave.numel(), piece):
            for part in decoder.feed(s, wave[start:start + piece]):
                if on_partial is not None:
                    on_partial(str(path), part)
        results.append(decoder.finalize(s))
    return results, {**decoder.latency_stats(), **auto}
