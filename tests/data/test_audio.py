"""Audio loading: every unusable file raises AudioError, a one-line UserError naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sparse_rnnt.data.audio import AudioError, audio_info, load_audio
from sparse_rnnt.errors import UserError

RATE = 16000


def _tone(n: int) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 220 * np.arange(n) / RATE)).astype(np.float32)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_refused(value, tmp_path: Path) -> None:
    wave = np.stack([_tone(800), _tone(800)], axis=1)
    wave[10, 1] = value  # one channel is enough: the mono average would be non-finite
    wave[20, 0] = value
    path = tmp_path / "bad.wav"
    sf.write(str(path), wave, RATE, subtype="FLOAT")
    with pytest.raises(AudioError) as err:
        load_audio(path)
    assert str(err.value) == f"{path}: 2 non-finite or out-of-range sample(s) (NaN, Inf or beyond ±10000)"
    assert err.value.path == str(path)
    assert isinstance(err.value, UserError)
    assert audio_info(path).frames == 800  # the header alone cannot tell


def test_finite_float_audio_loads_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "ok.wav"
    sf.write(str(path), _tone(800), RATE, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(path).numpy(), _tone(800))


def test_empty_audio_only_when_allowed(tmp_path: Path) -> None:
    path = tmp_path / "empty.wav"
    sf.write(str(path), _tone(0), RATE)
    with pytest.raises(AudioError, match="empty audio"):
        load_audio(path)
    assert load_audio(path, allow_empty=True).shape == (0,)


def test_missing_and_unreadable_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(AudioError) as err:
        load_audio(tmp_path / "gone.flac")
    assert str(err.value) == f"{tmp_path / 'gone.flac'}: audio file not found"
    with pytest.raises(AudioError, match="audio file not found"):
        audio_info(tmp_path / "gone.flac")
    junk = tmp_path / "junk.flac"
    junk.write_bytes(b"not audio" * 20)
    with pytest.raises(AudioError, match=rf"{junk}: unreadable audio \(") as err:
        load_audio(junk)
    assert err.value.path == str(junk)
    rate = tmp_path / "8k.wav"
    sf.write(str(rate), _tone(800), 8000)
    with pytest.raises(AudioError, match="sample rate 8000 Hz, expected 16000 Hz"):
        load_audio(rate)
    assert load_audio(rate, expected_rate=None).shape == (800,)
