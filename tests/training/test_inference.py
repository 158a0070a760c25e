"""Evaluating a checkpoint on a manifest whose audio went bad: one clear error, never a skip."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sparse_rnnt.config import load_config
from sparse_rnnt.data.manifest import read_manifest, write_manifest
from sparse_rnnt.errors import UserError
from sparse_rnnt.training.inference import evaluate_checkpoint
from sparse_rnnt.training.trainer import Trainer

RATE = 16000


@pytest.fixture(scope="module")
def run(tiny_manifests, tmp_path_factory) -> Path:
    """A 1-step checkpoint: decoding quality is irrelevant, only the audio path is exercised."""
    out = tmp_path_factory.mktemp("infer") / "run"
    items = {
        "data.manifest_dir": str(tiny_manifests), "data.workers": 1, "train.max_steps": 1,
        "train.eval_every": 0, "train.threads": 1, "train.progress": False, "batch.max_frames": 400,
        "model.transformer_num_layers": 2,
    }
    Trainer(load_config(None, [f"{k}={v}" for k, v in items.items()]), out).run()
    return out


def _tone(n: int) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 220 * np.arange(n) / RATE)).astype(np.float32)


def _nan_wav(path: Path, value: float) -> None:
    wave = _tone(RATE)
    wave[RATE // 2] = value
    sf.write(str(path), wave, RATE, subtype="FLOAT")  # float WAV keeps NaN/Inf


BAD: dict[str, tuple] = {
    # name -> (writer or None for a missing file, expected message fragment)
    "missing": (None, "audio file not found"),
    "junk": (lambda p: p.write_bytes(b"this is not audio" * 20), "unreadable audio"),
    "one_sample": (lambda p: sf.write(str(p), _tone(1), RATE), "1 sample(s), shorter than the 480 samples (30 ms)"),
    # 257 samples: one feature frame can be computed, but 2 frames give no encoder frame (stride 4).
    "479_samples": (lambda p: sf.write(str(p), _tone(479), RATE), "479 sample(s), shorter than the 480 samples"),
    "empty": (lambda p: sf.write(str(p), _tone(0), RATE), "empty audio"),
    "wrong_rate": (lambda p: sf.write(str(p), _tone(8000), 8000), "sample rate 8000 Hz, expected 16000 Hz"),
    "nan": (lambda p: _nan_wav(p, float("nan")), "1 non-finite or out-of-range sample(s) (NaN, Inf or beyond ±10000)"),
    "inf": (lambda p: _nan_wav(p, float("-inf")), "1 non-finite or out-of-range sample(s) (NaN, Inf or beyond ±10000)"),
}


def _break_test_split(tiny_manifests: Path, tmp_path: Path, name: str) -> tuple[Path, str, Path]:
    """A copy of the manifests whose 3rd test utterance points to a bad file; -> (dir, key, file)."""
    man = tmp_path / "manifests"
    shutil.copytree(tiny_manifests, man)
    test = read_manifest(man / "test.jsonl")
    writer, _ = BAD[name]
    audio = tmp_path / f"{name}.wav"
    if writer is not None:
        writer(audio)
    bad = test[2]
    test[2] = dataclasses.replace(bad, audio=str(audio))
    write_manifest(man / "test.jsonl", test)
    return man, bad.key, audio


@pytest.mark.parametrize("name", list(BAD))
def test_bad_audio_in_eval_names_the_utterance_and_file(name, run, tiny_manifests, tmp_path):
    man, key, audio = _break_test_split(tiny_manifests, tmp_path, name)
    with pytest.raises(UserError) as err:
        evaluate_checkpoint(run, man, split="test", progress=False, device="cpu")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"utterance {key} " in msg and str(audio) in msg and str(man / "test.jsonl") in msg
    assert BAD[name][1] in msg
    assert "re-run `sparse-rnnt data mls`" in msg


def test_the_intact_split_still_evaluates_every_utterance(run, tiny_manifests):
    res, _ = evaluate_checkpoint(run, tiny_manifests, split="test", progress=False, device="cpu")
    assert sum(c.utterances for c in res.per_language.values()) == 16  # nothing skipped


def test_shortest_decodable_audio_is_accepted(run, tiny_manifests, tmp_path):
    """480 samples = 4 feature frames = one encoder frame: the shortest decodable utterance."""
    man = tmp_path / "manifests"
    shutil.copytree(tiny_manifests, man)
    test = read_manifest(man / "test.jsonl")
    short = tmp_path / "short.wav"
    sf.write(str(short), _tone(480), RATE)
    test = [dataclasses.replace(test[0], audio=str(short), duration=480 / RATE)]
    write_manifest(man / "test.jsonl", test)
    # Alone in its batch: shorter audio could not even be encoded.
    res, _ = evaluate_checkpoint(run, man, split="test", languages=[test[0].language], progress=False,
                                 device="cpu")
    assert sum(c.utterances for c in res.per_language.values()) == 1


def test_cli_eval_reports_a_moved_corpus_in_one_line(run, tiny_manifests, tmp_path):
    man, key, audio = _break_test_split(tiny_manifests, tmp_path, "missing")
    proc = subprocess.run(
        [sys.executable, "-m", "sparse_rnnt.cli", "eval", "--checkpoint", str(run), "--manifest-dir", str(man),
         "--quiet", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert key in lines[0] and str(audio) in lines[0] and "sparse-rnnt data mls" in lines[0]


def test_a_language_without_utterances_is_named_not_dropped_from_the_average(run, tiny_manifests, tmp_path):
    man = tmp_path / "manifests"
    shutil.copytree(tiny_manifests, man)
    test = read_manifest(man / "test.jsonl")
    langs = sorted({u.language for u in test})
    assert len(langs) == 2
    write_manifest(man / "test.jsonl", [u for u in test if u.language == langs[0]])
    for chosen in (None, langs):  # the checkpoint's languages by default, or named
        with pytest.raises(UserError, match=rf"no test utterances for {langs[1]}; pass --languages {langs[0]} "):
            evaluate_checkpoint(run, man, split="test", languages=chosen, progress=False, device="cpu")
    res, _ = evaluate_checkpoint(run, man, split="test", languages=[langs[0]], progress=False, device="cpu")
    assert set(res.per_language) == {langs[0]}


def test_an_empty_reference_transcript_is_refused(run, tiny_manifests, tmp_path):
    # Its WER is undefined (errors per reference word); a language of only such utterances
    # used to score inf and write Infinity, which is not JSON.
    man = tmp_path / "manifests"
    shutil.copytree(tiny_manifests, man)
    test = read_manifest(man / "test.jsonl")
    test[3] = dataclasses.replace(test[3], text="  ")
    write_manifest(man / "test.jsonl", test)
    with pytest.raises(UserError, match=rf"1 utterance\(s\) with an empty transcript \(first: {test[3].key}\)"):
        evaluate_checkpoint(run, man, split="test", progress=False, device="cpu")
