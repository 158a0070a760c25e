"""``sparse-rnnt stream`` on files: any length decodes, bad files give one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from sparse_rnnt.config import load_config
from sparse_rnnt.data.audio import AudioError
from sparse_rnnt.data.manifest import load_split
from sparse_rnnt.errors import UserError
from sparse_rnnt.export import ExportOptions, export_checkpoint
from sparse_rnnt.streaming.files import read_wave, stream_files
from sparse_rnnt.training.trainer import Trainer

RATE = 16000


def _tone(n: int, rate: int = RATE) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 220 * np.arange(n) / rate)).astype(np.float32)


@pytest.fixture(scope="module")
def artifact(tiny_manifests, tmp_path_factory) -> Path:
    """A dense artifact of a 1-step run (decoding quality is irrelevant here)."""
    root = tmp_path_factory.mktemp("stream_files")
    items = {
        "data.manifest_dir": str(tiny_manifests), "data.workers": 1, "train.max_steps": 1,
        "train.eval_every": 0, "train.threads": 1, "train.progress": False, "batch.max_frames": 400,
        "model.transformer_num_layers": 2,
    }
    Trainer(load_config(None, [f"{k}={v}" for k, v in items.items()]), root / "run").run()
    export_checkpoint(root / "run", root / "art", ExportOptions())
    return root / "art"


@pytest.fixture(scope="module")
def short_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("short")
    files = {}
    for name, n, rate in (("zero", 0, RATE), ("one", 1, RATE), ("256", 256, RATE), ("479", 479, RATE),
                          ("one_8k", 1, 8000), ("zero_8k", 0, 8000)):
        files[name] = d / f"{name}.wav"
        sf.write(str(files[name]), _tone(n, rate), rate)
    return files


def test_read_wave_accepts_any_length(short_files):
    assert read_wave(short_files["zero"]).shape == (0,)
    assert read_wave(short_files["one"]).shape == (1,)
    assert read_wave(short_files["zero_8k"]).shape == (0,)
    assert read_wave(short_files["one_8k"]).shape == (2,)  # resampled to 16 kHz


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_read_wave_rejects_non_finite_samples(value, tmp_path):
    wave = _tone(RATE)
    wave[100] = value
    path = tmp_path / "bad.wav"
    sf.write(str(path), wave, RATE, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"1 non-finite sample\(s\) \(NaN or Inf\)") as err:
        read_wave(path)
    assert str(path) in str(err.value) and isinstance(err.value, UserError)


def test_read_wave_names_a_missing_file(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'gone.flac'}: audio file not found"):
        read_wave(tmp_path / "gone.flac")


def test_short_files_stream_to_an_empty_hypothesis(artifact, short_files, tiny_manifests):
    real = load_split(tiny_manifests, "test")[0].audio
    paths = [str(short_files[k]) for k in ("zero", "one", "256", "479", "one_8k", "zero_8k")] + [real]
    results, stats = stream_files(artifact, paths)
    assert [r.stream_id for r in results] == paths
    for r in results[:-1]:
        assert r.tokens == [] and r.text == "" and r.num_chunks == 0
    assert results[-1].num_chunks > 0  # a real file in the same run still streams chunk by chunk
    assert stats["steps"] == results[-1].num_chunks
    # The same real file alone decodes identically: the short ones did not disturb the decoder.
    alone, _ = stream_files(artifact, [real])
    assert alone[0].tokens == results[-1].tokens


def test_cli_stream_short_and_bad_files(artifact, short_files, tmp_path):
    def run(*audio: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sparse_rnnt.cli", "stream", "--artifact", str(artifact),
                               "--quiet", *audio], capture_output=True, text=True, timeout=300)

    proc = run(str(short_files["one"]), str(short_files["zero"]))
    assert proc.returncode == 0, proc.stderr
    assert f"{short_files['one']}:   (audio 0.00 s" in proc.stdout
    nan = tmp_path / "nan.wav"
    wave = _tone(RATE)
    wave[5] = np.nan
    sf.write(str(nan), wave, RATE, subtype="FLOAT")
    for bad, message in ((nan, "non-finite"), (tmp_path / "gone.wav", "audio file not found")):
        proc = run(str(short_files["one"]), str(bad))
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"sparse-rnnt stream: error: {bad}: ")
        assert message in lines[0]
        assert proc.stdout == ""  # every file is checked before any decoding


def test_decoder_refuses_a_non_finite_piece_and_goes_on(artifact):
    from sparse_rnnt.export import load_artifact
    from sparse_rnnt.streaming import StreamingDecoder

    dec = StreamingDecoder.from_artifact(load_artifact(artifact))
    s = dec.open()
    with pytest.raises(ValueError, match="non-finite"):
        dec.feed(s, torch.tensor([0.0, float("nan")]))
    dec.feed(s, torch.from_numpy(_tone(4000)))
    assert dec.finalize(s).audio_s == 4000 / RATE
