"""``sparse-rnnt stream`` on files: any length decodes, bad files give one clear line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_rnnt.config import load_config
from sparse_rnnt.data.audio import AudioError
from sparse_rnnt.data.manifest import load_split
from sparse_rnnt.errors import UserError
from sparse_rnnt.export import ExportOptions, export_checkpoint, load_artifact
from sparse_rnnt.export.artifact import Artifact
from sparse_rnnt.io import sha256_file
from sparse_rnnt.streaming.files import read_wave, stream_files
from sparse_rnnt.training.trainer import Trainer

sf = pytest.importorskip("soundfile", reason="the GPU image has no soundfile; CPU CI installs it")

RATE = 16000


def _tone(n: int, rate: int = RATE) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 220 * np.arange(n) / rate)).astype(np.float32)


@pytest.fixture(scope="module")
def dense_run(tiny_manifests, tmp_path_factory) -> Path:
    """A 1-step run (decoding quality is irrelevant here)."""
    root = tmp_path_factory.mktemp("stream_files")
    items = {
        "data.manifest_dir": str(tiny_manifests), "data.workers": 1, "train.max_steps": 1,
        "train.eval_every": 0, "train.threads": 1, "train.progress": False, "batch.max_frames": 400,
        "model.transformer_num_layers": 2,
    }
    Trainer(load_config(None, [f"{k}={v}" for k, v in items.items()]), root / "run").run()
    return root / "run"


@pytest.fixture(scope="module")
def artifact(dense_run) -> Path:
    """A dense artifact of the 1-step run."""
    export_checkpoint(dense_run, dense_run.parent / "art", ExportOptions())
    return dense_run.parent / "art"


@pytest.fixture(scope="module")
def ml_artifact(dense_run) -> Path:
    """A multilingual (en, fr) artifact: one dynamic-pathways step from different per-language
    masks (70 % kept), so the two pathways' weights differ."""
    from sparse_rnnt.pruning.masks import LanguageMasks, MaskSet
    from sparse_rnnt.pruning.scope import ScopeConfig, select_parameters
    from sparse_rnnt.training.inference import load_recognizer
    from tests.training.test_prune import _prune_cfg

    root = dense_run.parent
    params = select_parameters(load_recognizer(dense_run).model, ScopeConfig())
    g = torch.Generator().manual_seed(0)
    LanguageMasks({lang: MaskSet({n: torch.rand(p.shape, generator=g) < 0.7 for n, p in params.items()})
                   for lang in ("en", "fr")}).save(root / "init.safetensors")
    cfg = _prune_cfg(dense_run, "dynamic-pathways", **{
        "train.max_steps": 1, "train.checkpoint_every": 1, "pruning.init_masks": str(root / "init.safetensors"),
        "pruning.levels": "[0.5]", "pruning.target_sparsity": 0.5})
    Trainer(cfg, root / "dyn", init_checkpoint=dense_run).run()
    export_checkpoint(root / "dyn", root / "ml_art", ExportOptions(multilingual=True))
    return root / "ml_art"


def _lower_blank(model: torch.nn.Module, by: float = 3.0) -> None:
    """Make the barely trained model emit tokens (blank is the last symbol), so that token
    comparisons are not between empty hypotheses."""
    with torch.no_grad():
        model.rnnt.joiner.linear.bias[-1] -= by  # type: ignore[union-attr,index]


def _full_utterance(art: Artifact, wave: torch.Tensor) -> list[int]:
    """Reference: the whole utterance through the artifact's front end (its own feature config),
    CMVN and model, batched greedy decoding."""
    from sparse_rnnt.data.features import LogMel
    from sparse_rnnt.model.decoding import greedy_search

    feats = art.cmvn.normalize(LogMel(art.features)(wave))
    with torch.inference_mode():
        return greedy_search(art.model, feats[None], torch.tensor([feats.shape[0]]))[0]


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


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1e30, -2e4])
def test_read_wave_rejects_non_finite_samples(value, tmp_path):
    wave = _tone(RATE)
    wave[100] = value
    path = tmp_path / "bad.wav"
    sf.write(str(path), wave, RATE, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"1 non-finite or out-of-range sample\(s\) \(NaN, Inf or beyond ±10000\)") as err:
        read_wave(path)
    assert str(path) in str(err.value) and isinstance(err.value, UserError)


def test_rates_that_resample_only_at_huge_cost_are_refused_by_name(artifact, tmp_path):
    # 16001 Hz reduces to 16001:16000 (torchaudio's kernel took 4.7 GB for 1 s of it); 44.1 kHz
    # to 441:160, resampled as usual.
    odd, cd = tmp_path / "odd.wav", tmp_path / "cd.wav"
    sf.write(str(odd), _tone(16001, 16001), 16001)
    sf.write(str(cd), _tone(44100, 44100), 44100)
    assert read_wave(cd).shape == (16000,)
    with pytest.raises(AudioError, match=r"odd\.wav: sample rate 16001 Hz cannot be resampled to 16000 Hz .*16001:16000"):
        read_wave(odd)
    partials = []
    with pytest.raises(AudioError, match=r"odd\.wav: sample rate 16001 Hz"):
        stream_files(artifact, [str(cd), str(odd)], on_partial=lambda path, part: partials.append(path))
    assert partials == []  # refused before the first file was decoded
    stream_files(artifact, [str(cd)], on_partial=lambda path, part: partials.append(path))
    assert partials  # (which alone gives partial results)


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
    assert f"{short_files['one']}:   (audio 0.00 s, RTF " in proc.stdout
    assert f"{short_files['zero']}:   (audio 0.00 s, RTF n/a (no audio))" in proc.stdout  # was "RTF nan"
    assert "chunk steps: 0, no latency (no chunk step ran); overall RTF " in proc.stdout  # was "p50 nan ms"
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


def _retarget(src: Path, dst: Path, sample_rate: int) -> None:
    """Copy an artifact with ``features.sample_rate`` changed (a valid config the trainer honours)
    and the joiner's blank logit lowered; the manifest's hashes are updated."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["features"]["sample_rate"] = sample_rate
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(dst / "weights.safetensors"))
    tensors["dense/rnnt.joiner.linear.bias"][-1] -= 3.0
    save_file(tensors, str(dst / "weights.safetensors"))
    manifest = json.loads((dst / "manifest.json").read_text())
    for name in ("config.json", "weights.safetensors"):
        manifest["files"][name]["sha256"] = sha256_file(dst / name)
    (dst / "manifest.json").write_text(json.dumps(manifest))


def test_stream_files_uses_the_artifacts_sample_rate(artifact, tiny_manifests, tmp_path):
    # A model trained on 8 kHz features expects 8 kHz audio: files are resampled to the
    # artifact's rate (they were always resampled to 16 kHz: a 1 s file was reported as 2 s).
    import torchaudio.functional as AF

    art_dir = tmp_path / "art8k"
    _retarget(artifact, art_dir, 8000)
    utt = load_split(tiny_manifests, "test")[0].audio  # a 16 kHz FLAC
    data16, rate16 = sf.read(utt, dtype="float32")
    assert rate16 == RATE
    wave16 = torch.from_numpy(data16)
    file8k = tmp_path / "utt8k.wav"
    sf.write(str(file8k), AF.resample(wave16, RATE, 8000).numpy(), 8000, subtype="FLOAT")
    wave8 = torch.from_numpy(sf.read(str(file8k), dtype="float32")[0])  # what the 8 kHz file holds

    results, stats = stream_files(art_dir, [str(file8k), utt], piece_ms=70)
    art = load_artifact(art_dir)
    assert art.features.sample_rate == 8000
    at_8k = _full_utterance(art, wave8)
    assert len(at_8k) > 0 and results[0].tokens == at_8k  # the 8 kHz file is decoded as is
    assert results[0].audio_s == pytest.approx(wave8.numel() / 8000)
    assert results[0].rtf == pytest.approx(results[0].processing_s / results[0].audio_s)
    # the 16 kHz file is decoded from its audio at 8 kHz; its duration is unchanged
    assert results[1].tokens == _full_utterance(art, AF.resample(wave16, RATE, 8000))
    assert results[1].audio_s == pytest.approx(wave16.numel() / RATE, abs=1 / 8000)
    assert stats["audio_s"] == pytest.approx(results[0].audio_s + results[1].audio_s)
    assert read_wave(file8k, sample_rate=8000).shape == wave8.shape
    assert read_wave(utt, sample_rate=8000).shape == (wave16.numel() // 2,)


def test_multilingual_artifact_stream_needs_a_language(ml_artifact, artifact, tiny_manifests):
    from sparse_rnnt.streaming import StreamingDecoder

    wave = read_wave(next(u for u in load_split(tiny_manifests, "test") if u.language == "fr").audio)
    art = load_artifact(ml_artifact)
    assert art.multilingual and art.languages == ["en", "fr"]
    _lower_blank(art.model)
    refs = {}
    for lang in ("en", "fr"):
        art.set_language(lang)
        refs[lang] = _full_utterance(art, wave)
    assert refs["en"] != refs["fr"] and refs["fr"]  # the pathways decode differently
    dec = StreamingDecoder.from_artifact(art)
    # Before: the stream ran with the pathway set last (here "fr"), with no error.
    with pytest.raises(ValueError, match=r"open\(\) needs a language \(one of en, fr\)"):
        dec.open()
    with pytest.raises(ValueError, match="needs a language"):
        dec.run_concurrent([wave])
    assert not dec.streams and dec.pool.in_use == 0
    art.set_language("en")  # the last pathway set is not the stream's
    assert dec.transcribe(wave, language="fr").tokens == refs["fr"]
    # A single-language artifact needs no language.
    single = load_artifact(artifact)
    _lower_blank(single.model)
    ref = _full_utterance(single, wave)
    assert ref and StreamingDecoder.from_artifact(single).transcribe(wave).tokens == ref


@pytest.mark.parametrize("cpu_sparse", ["dense", pytest.param("kernel", marks=pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler to build the CPU kernel"))])
def test_bf16_artifact_streams_between_float32_norms(dense_run, tiny_manifests, tmp_path, cpu_sparse):
    # A bf16 artifact keeps norms and LSTM in float32: its layers must hand float32 back and the
    # stream must feed float32, or CUDA's layer_norm refuses the mix (it did on the H100, where
    # the CPU kernels had accepted it). The hooks apply CUDA's rule here. On the CPU the bitmap
    # layers are decompressed ("dense") or run the C++ kernel ("kernel").
    from sparse_rnnt.export.formats import ExportedLinear
    from sparse_rnnt.streaming import StreamingDecoder
    from tests.export.test_artifact import _cuda_dtype_rule

    export_checkpoint(dense_run, tmp_path / "bf16", ExportOptions(fmt="bitmap", dtype="bfloat16"))
    art = load_artifact(tmp_path / "bf16", cpu_sparse=cpu_sparse)
    layers = [m for m in art.model.modules() if isinstance(m, ExportedLinear)]
    assert layers and {m.compute_dtype for m in layers} == {torch.bfloat16}
    assert {m.runtime for m in layers} == {"torch" if cpu_sparse == "dense" else "cpu"}
    _cuda_dtype_rule(art.model)
    _lower_blank(art.model)
    wave = read_wave(load_split(tiny_manifests, "test")[0].audio)
    ref = _full_utterance(art, wave)
    dec = StreamingDecoder.from_artifact(art)
    assert dec.dtype == art.model.activation_dtype == torch.float32
    assert ref and dec.transcribe(wave).tokens == ref


def test_cli_prints_partials_when_their_text_changes_and_not_before_there_is_any(monkeypatch, capsys):
    # A chunk that emits nothing yet (or a silent file's final partial) printed "path [0.16s] ".
    import sparse_rnnt.streaming.files as files_mod
    from sparse_rnnt.cli import main
    from sparse_rnnt.streaming import PartialResult

    def fake(artifact, paths, *, on_partial, **kwargs):
        for i, text in enumerate(["", "", "a", "a", "ab"]):
            on_partial("x.wav", PartialResult("x.wav", i, [], [], text, 0.01, i == 4, audio_end_s=0.16 * (i + 1)))
        on_partial("silent.wav", PartialResult("silent.wav", -1, [], [], "", 0.0, True))
        return [], {"steps": 0, "p50_s": 0.0, "p99_s": 0.0, "rtf": float("nan")}

    monkeypatch.setattr(files_mod, "stream_files", fake)
    assert main(["stream", "--artifact", "unused", "x.wav", "silent.wav"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["x.wav [  0.48s] a", "x.wav [  0.80s] ab"]
    assert not any(line.startswith("silent.wav [") for line in lines)
