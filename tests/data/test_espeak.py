"""eSpeak NG ctypes binding: audio properties, voice parameters, errors, reproducibility."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import espeakng_loader
import numpy as np
import pytest

from sparse_rnnt.data.espeak import Espeak, EspeakError, Voice, list_variants

SHORT = "hello"
LONG = "hello, this is a considerably longer sentence that takes the synthesizer some time to say"


@pytest.fixture(scope="module")
def espeak() -> Espeak:
    return Espeak.shared()


def _f0(wave: np.ndarray, rate: int) -> float:
    """Median fundamental frequency of voiced 40 ms frames by autocorrelation (40-500 Hz)."""
    frame = int(0.04 * rate)
    lo, hi = int(rate / 500), int(rate / 40)
    peak = np.max(np.abs(wave))
    estimates = []
    for start in range(0, wave.shape[0] - frame, frame):
        x = wave[start : start + frame].astype(np.float64)
        if np.max(np.abs(x)) < 0.3 * peak:
            continue
        x = x - x.mean()
        ac = np.correlate(x, x, mode="full")[frame - 1 :]
        if ac[0] <= 0:
            continue
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.3 * ac[0]:  # clearly periodic: voiced
            estimates.append(rate / lag)
    assert len(estimates) >= 3, "no voiced frames found"
    return float(np.median(estimates))


def test_sample_rate_and_non_silent_audio(espeak: Espeak) -> None:
    assert espeak.sample_rate == 22050
    wave = espeak.synthesize(LONG, Voice("en-us", "m3", 175, 50))
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert np.all(np.abs(wave) <= 1.0)
    duration = wave.shape[0] / espeak.sample_rate
    assert 2.0 < duration < 12.0  # ~16 words at 175 wpm is about 5 s
    rms = float(np.sqrt(np.mean(wave.astype(np.float64) ** 2)))
    assert rms > 0.01
    # Speech, not a constant or a click: a large share of 10 ms frames carries energy.
    frames = wave[: wave.shape[0] // 220 * 220].reshape(-1, 220)
    assert np.mean(np.abs(frames).max(axis=1) > 0.05) > 0.4


def test_longer_text_gives_longer_audio(espeak: Espeak) -> None:
    voice = Voice("en-us", "f2", 175, 50)
    short = espeak.synthesize(SHORT, voice)
    long = espeak.synthesize(LONG, voice)
    assert long.shape[0] > 3 * short.shape[0]


@pytest.mark.parametrize("language", ["en-us", "fr", "it", "nl"])
def test_rate_changes_duration_in_the_right_direction(espeak: Espeak, language: str) -> None:
    slow = espeak.synthesize(LONG, Voice(language, "m1", 120, 50)).shape[0]
    fast = espeak.synthesize(LONG, Voice(language, "m1", 300, 50)).shape[0]
    # Duration scales roughly with 1/rate (pauses and padding scale less): 2.5x nominal.
    assert 1.6 < slow / fast < 3.5


def test_pitch_parameter_raises_fundamental_frequency(espeak: Espeak) -> None:
    low = _f0(espeak.synthesize(LONG, Voice("en-us", "m3", 160, 25, 0)), espeak.sample_rate)
    high = _f0(espeak.synthesize(LONG, Voice("en-us", "m3", 160, 85, 0)), espeak.sample_rate)
    assert high > 1.3 * low
    assert 50 < low < 400 and 50 < high < 450


def test_unknown_variant_and_language_raise(espeak: Espeak) -> None:
    with pytest.raises(EspeakError, match="no-such-variant"):
        espeak.synthesize(SHORT, Voice("en-us", "no-such-variant"))
    with pytest.raises(EspeakError, match="xx-nowhere"):
        espeak.synthesize(SHORT, Voice("xx-nowhere", "m3"))
    with pytest.raises(EspeakError, match="rate"):
        espeak.synthesize(SHORT, Voice("en-us", "m3", rate=20))
    with pytest.raises(EspeakError, match="pitch"):
        espeak.synthesize(SHORT, Voice("en-us", "m3", pitch=101))
    with pytest.raises(EspeakError, match="empty"):
        espeak.synthesize("   ", Voice("en-us", "m3"))
    # The instance still works after the errors.
    assert espeak.synthesize(SHORT, Voice("en-us", "m3")).shape[0] > 1000


def test_second_instance_in_one_process_is_refused(espeak: Espeak) -> None:
    with pytest.raises(EspeakError, match="already exists"):
        Espeak()
    assert Espeak.shared() is espeak


def test_list_variants_matches_the_data_directory() -> None:
    vdir = Path(espeakng_loader.get_data_path()) / "voices" / "!v"
    expected = sorted(n for n in os.listdir(vdir) if (vdir / n).is_file())
    variants = list_variants()
    assert variants == expected == sorted(variants)
    assert {"m3", "f2"} <= set(variants)


def test_voice_name_is_stable_unique_and_tab_free() -> None:
    a = Voice("en-us", "m3", 160, 45, 50)
    assert a.name() == Voice("en-us", "m3", 160, 45, 50).name()
    names = {Voice(lang, v, r, p).name() for lang in ("en-us", "fr") for v in ("m3", "f2") for r in (150, 160) for p in (40, 45)}
    assert len(names) == 16
    assert not any(ch.isspace() for ch in Voice("en-us", "Mr serious").name())
    assert a.espeak_name() == "en-us+m3"


_CHILD = """
import hashlib, json, sys
from sparse_rnnt.data.espeak import Espeak, Voice
e = Espeak()
out = []
for text, var in [("one two three", "f1"), ("quatre cinq six", "whisper"), ("one two three", "f1")]:
    w = e.synthesize(text, Voice("en-us" if text[0] == "o" else "fr", var, 170, 50), seed=1234)
    out.append(hashlib.sha256(w.tobytes()).hexdigest())
print(json.dumps(out))
"""


def test_seeded_call_sequence_is_reproducible_across_processes() -> None:
    runs = [
        json.loads(subprocess.run([sys.executable, "-c", _CHILD], check=True, capture_output=True, text=True).stdout)
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[0][1]


_MISSING_LIB = """
import espeakng_loader
espeakng_loader.get_library_path = lambda: "/nonexistent/dir/libespeak-ng.so"
from sparse_rnnt.data.espeak import Espeak, EspeakError
try:
    Espeak()
except EspeakError as e:
    print("ERR", e)
"""


def test_missing_library_is_a_clear_error() -> None:
    res = subprocess.run([sys.executable, "-c", _MISSING_LIB], check=True, capture_output=True, text=True)
    assert res.stdout.startswith("ERR")
    assert "/nonexistent/dir/libespeak-ng.so" in res.stdout
