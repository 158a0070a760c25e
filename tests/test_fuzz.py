"""Fuzzing the readers of untrusted input: the MLS corpus reader, the artifact loader and the
config parser. Property: every input either loads or raises :class:`UserError` (never another
exception, which the CLI would show as a traceback), and nothing is written outside the output
directory (the sandbox holding the inputs is listed before and after)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_rnnt.config import ExperimentConfig, load_config, to_dict
from sparse_rnnt.data.features import GlobalCMVN
from sparse_rnnt.data.mls import read_mls, write_manifests
from sparse_rnnt.data.tokenizer import Tokenizer, TokenizerConfig
from sparse_rnnt.errors import UserError
from sparse_rnnt.export import ExportOptions, export_checkpoint, load_artifact
from sparse_rnnt.model.rnnt import build_model
from sparse_rnnt.training.checkpoint import save_checkpoint

# SPARSE_RNNT_FUZZ_EXAMPLES raises the example count for a deeper local run (default: fast).
FUZZ = settings(max_examples=int(os.environ.get("SPARSE_RNNT_FUZZ_EXAMPLES", "100")), deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _listing(root: Path, skip: Path | None = None) -> dict[str, int]:
    """Every path under ``root`` (except ``skip``'s subtree) with its size (-1 for directories)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if skip is not None:
            dirnames[:] = [n for n in dirnames if d / n != skip]
        for n in dirnames:
            out[str((d / n).relative_to(root))] = -1
        for n in filenames:
            p = d / n
            out[str(p.relative_to(root))] = p.lstat().st_size
    return out


def _only_user_errors(fn: Callable[[], Any]) -> Any:
    """Run ``fn``: a UserError is an accepted outcome (returns None); anything else fails."""
    try:
        return fn()
    except UserError as e:
        assert str(e).strip(), "a UserError must say what is wrong"
        return None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


# ------------------------------------------------------------------------------ MLS reader


def _flac_bytes(n: int = 1600) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (0.2 * np.sin(np.arange(n) / 7)).astype(np.float32), 16000, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


GOOD_FLAC = _flac_bytes()
IDS = ["1_2_3", "1_2_4", "10_20_000001", "7_8_9"]

line_strategy = st.one_of(
    st.tuples(st.sampled_from(IDS), st.text(max_size=15)).map(lambda t: f"{t[0]}\t{t[1]}".encode()),
    st.text(max_size=25).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=25),
    st.sampled_from([b"", b"\t", b"1_2_3", b"\tno id", b"../x_y_z\ttext", b"a/b_c_d\tx", b"1_2_3\t\xff\xfe",
                     b"\xef\xbb\xbf1_2_3\tbom", b"1_2_3\ttext\r", b"1_2_3\t" + b"a" * 300]),
)
audio_strategy = st.one_of(
    st.just(("good", b"")), st.just(("missing", b"")), st.just(("dir", b"")),
    st.binary(max_size=64).map(lambda b: ("bytes", b)),
    st.integers(1, len(GOOD_FLAC) - 1).map(lambda n: ("truncated", GOOD_FLAC[:n])),
)


@FUZZ
@given(
    lines=st.lists(line_strategy, max_size=8),
    audio=st.dictionaries(st.sampled_from(IDS), audio_strategy, max_size=4),
    segments=st.none() | st.binary(max_size=60) | st.lists(line_strategy, max_size=3).map(b"\n".join),
    handles=st.none() | st.binary(max_size=40) | st.lists(st.sampled_from(IDS), max_size=3).map(
        lambda ids: "\n".join(ids).encode()),
    transcripts_kind=st.sampled_from(["file", "file", "file", "dir", "missing"]),
    subset=st.sampled_from([None, None, "9hr", "1hr", "2hr"]),
    check_audio=st.booleans(),
    splits=st.sampled_from([("train",), ("train", "dev"), ("dev",), ("bogus",)]),
)
def test_mls_reader_never_crashes(lines, audio, segments, handles, transcripts_kind, subset, check_audio, splits):
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        split_dir = base / "corpus" / "mls_english" / "train"
        split_dir.mkdir(parents=True)
        transcripts = split_dir / "transcripts.txt"
        if transcripts_kind == "file":
            transcripts.write_bytes(b"\n".join(lines))
        elif transcripts_kind == "dir":
            transcripts.mkdir()
        for utt_id, (kind, data) in audio.items():
            spk, book, _ = utt_id.split("_")
            path = split_dir / "audio" / spk / book / f"{utt_id}.flac"
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "good":
                path.write_bytes(GOOD_FLAC)
            elif kind == "dir":
                path.mkdir()
            elif kind != "missing":
                path.write_bytes(data)
        if segments is not None:
            (split_dir / "segments.txt").write_bytes(segments)
        if handles is not None:
            (split_dir / "limited_supervision" / "9hr").mkdir(parents=True)
            (split_dir / "limited_supervision" / "9hr" / "handles.txt").write_bytes(handles)
        out = base / "manifests"
        before = _listing(base)

        def run() -> None:
            utts, report = read_mls(base / "corpus", splits=splits, subset=subset, check_audio=check_audio,
                                    workers=1, progress=False)
            for split_utts in utts.values():
                for u in split_utts:
                    assert Path(u.audio).is_file() and Path(u.audio).is_relative_to(base / "corpus")
                    assert u.text.strip() and "\n" not in u.text
            assert report.num_ok == sum(len(v) for v in utts.values())
            write_manifests(out, utts, report)
            assert {p.name for p in out.iterdir()} == {f"{s}.jsonl" for s in utts} | {"read_report.json"}

        _only_user_errors(run)
        assert _listing(base, skip=out) == before


# ------------------------------------------------------------------------------ artifact loader


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory) -> Path:
    """A real (dense, tiny) artifact written by export_checkpoint, to be mutated."""
    root = tmp_path_factory.mktemp("fuzz_artifact")
    tok = Tokenizer.train(["the cat sat", "a mat"], TokenizerConfig(), root / "tok.model")
    cmvn = GlobalCMVN.fit([torch.randn(50, 80, generator=torch.Generator().manual_seed(0))])
    cmvn.save(root / "cmvn.safetensors")
    cfg = load_config(None, ["model.transformer_num_layers=1", "model.encoding_dim=32",
                             "model.transformer_ffn_dim=64", "model.symbol_embedding_dim=16"])
    torch.manual_seed(0)
    model = build_model(cfg.model, tok.num_symbols, verbose=False)
    save_checkpoint(root / "run", 1, model, config=to_dict(cfg), extra={"languages": ["en"]},
                    files={"tokenizer.model": root / "tok.model", "cmvn.safetensors": root / "cmvn.safetensors"})
    export_checkpoint(root / "run", root / "artifact", ExportOptions(fmt="dense", language="en"))
    return root / "artifact"


FILE_NAMES = ["manifest.json", "config.json", "weights.safetensors", "tokenizer.model", "cmvn.safetensors"]
BAD_MEMBER_NAMES = ["../x", "../../etc/passwd", "/etc/passwd", "sub/weights.safetensors", "", ".", "..",
                    "..\\x", "weights.safetensors/", "~/.bashrc"]

# One mutation: (target, path of keys into the JSON, action, value).
json_path = st.lists(st.one_of(st.sampled_from(["files", "layers", "model", "features", "languages", "sha256",
                                                 "weights.safetensors", "num_symbols", "format", "version",
                                                 "weight_format", "dtype", "multilingual", "encoding_dim",
                                                 "input_dim", "shape"]),
                               st.text(max_size=6)), min_size=1, max_size=3)
mutation = st.one_of(
    st.tuples(st.sampled_from(["manifest.json", "config.json"]), json_path, st.just("set"), json_values),
    st.tuples(st.sampled_from(["manifest.json", "config.json"]), json_path, st.just("delete"), st.none()),
    st.tuples(st.just("manifest.json"), st.just([]), st.just("rename_member"),
              st.tuples(st.sampled_from(FILE_NAMES[1:]), st.sampled_from(BAD_MEMBER_NAMES))),
    st.tuples(st.sampled_from(FILE_NAMES), st.just([]), st.sampled_from(["bytes", "bytes_rehash"]),
              st.binary(max_size=80)),
    st.tuples(st.sampled_from(FILE_NAMES), st.just([]), st.just("delete_file"), st.none()),
    st.tuples(st.just("manifest.json"), st.just([]), st.just("whole"), json_values),
)


def _set_in(obj: Any, path: list[str], value: Any, delete: bool) -> None:
    node = obj
    for key in path[:-1]:
        if isinstance(node, dict) and isinstance(node.get(key), (dict, list)):
            node = node[key]
        elif isinstance(node, list) and node:
            node = node[0]
        else:
            break
    if isinstance(node, dict):
        if delete:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    elif isinstance(node, list) and node:
        if delete:
            node.pop()
        else:
            node[0] = value


def _rehash(root: Path, name: str) -> None:
    import hashlib

    manifest = json.loads((root / "manifest.json").read_text())
    files = manifest.get("files") if isinstance(manifest, dict) else None
    entry = files.get(name) if isinstance(files, dict) else None
    if isinstance(entry, dict):
        entry["sha256"] = hashlib.sha256((root / name).read_bytes()).hexdigest()
        (root / "manifest.json").write_text(json.dumps(manifest))


def _apply(root: Path, m: tuple) -> None:
    """Apply one mutation; one that no longer applies (e.g. to a manifest already replaced by
    random bytes) is a no-op."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        _apply_one(root, m)


def _apply_one(root: Path, m: tuple) -> None:
    target, path, action, value = m
    f = root / target
    if action in ("set", "delete"):
        obj = json.loads(f.read_text())
        _set_in(obj, path, value, action == "delete")
        f.write_text(json.dumps(obj))
        if target != "manifest.json":
            _rehash(root, target)  # get past the hash check into the parser
    elif action == "rename_member":
        old, new = value
        obj = json.loads(f.read_text())
        obj["files"][new] = obj["files"].pop(old)
        f.write_text(json.dumps(obj))
    elif action in ("bytes", "bytes_rehash"):
        f.write_bytes(value)
        if action == "bytes_rehash" and target != "manifest.json":
            _rehash(root, target)
    elif action == "delete_file":
        f.unlink()
    elif action == "whole":
        f.write_text(json.dumps(value))


@FUZZ
@given(mutations=st.lists(mutation, min_size=1, max_size=3))
def test_artifact_loader_never_crashes(artifact_dir, mutations):
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root = base / "art"
        shutil.copytree(artifact_dir, root)
        (base / "x").write_text("outside the artifact")  # what "../x" would reach
        for m in mutations:
            _apply(root, m)
        before = _listing(base)
        art = _only_user_errors(lambda: load_artifact(root))
        if art is not None:  # loaded: it must be the real artifact, files it names inside it
            names = art.manifest["files"]
            assert all((root / n).resolve().parent == root.resolve() for n in names)
        assert _listing(base) == before


def test_artifact_loader_rejects_path_traversal(artifact_dir, tmp_path):
    """Deterministic companions of the fuzzer: each escaping member name is refused by name."""
    for bad in BAD_MEMBER_NAMES:
        root = tmp_path / f"a{BAD_MEMBER_NAMES.index(bad)}"
        shutil.copytree(artifact_dir, root)
        _apply_one(root, ("manifest.json", [], "rename_member", ("tokenizer.model", bad)))
        with pytest.raises(UserError):
            load_artifact(root)


@pytest.mark.parametrize("name", FILE_NAMES)
def test_artifact_loader_random_bytes_in_any_file(artifact_dir, tmp_path, name):
    """Garbage in any file, its hash updated so the parser (not the hash check) meets it."""
    rng = np.random.default_rng(FILE_NAMES.index(name))
    for i, data in enumerate([b"", b"\xff\xfe\x00", rng.bytes(7), rng.bytes(200), b"{}", b"[1]"]):
        root = tmp_path / f"a{i}"
        shutil.copytree(artifact_dir, root)
        _apply_one(root, (name, [], "bytes_rehash", data))
        with pytest.raises(UserError):
            load_artifact(root)


@pytest.mark.parametrize("value", [0, 1, -2, 10**30, "x", None, [3]])
def test_artifact_loader_bad_num_symbols(artifact_dir, tmp_path, value):
    root = tmp_path / "a"
    shutil.copytree(artifact_dir, root)
    _apply_one(root, ("config.json", ["num_symbols"], "set", value))
    with pytest.raises(UserError):
        load_artifact(root)


# ------------------------------------------------------------------------------ config parser


def test_config_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"train:\n  max_steps: 3 # \xe9t\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(UserError, match=r"config\.yaml"):
        load_config(path)


def _config_keys() -> list[str]:
    tree = to_dict(ExperimentConfig())
    keys = []
    for section, fields in tree.items():
        if isinstance(fields, dict):
            keys.extend(f"{section}.{k}" for k in fields)
    return [*keys, "pruning.method", "pruning.levels", "pruning.granularity", "pruning.granularity.kind"]


CONFIG_KEYS = _config_keys()
override_key = st.one_of(st.sampled_from(CONFIG_KEYS), st.sampled_from([k.split(".")[0] for k in CONFIG_KEYS]),
                         st.text(max_size=12))
override_value = st.one_of(
    st.sampled_from(["", "0", "-1", "1e-3", "true", "null", "[]", "{}", "[1, 2]", "{a: 1}", "tiny", "en,fr",
                     "cuda:x", "nan", ".inf", "'", "[", "{kind: nm, n: 2, m: 4}", "1:2", "- a\n- b", "!!python/none"]),
    st.text(max_size=15),
)
yaml_doc = st.one_of(
    st.dictionaries(st.sampled_from([*sorted({k.split(".")[0] for k in CONFIG_KEYS}), "bogus"]),
                    st.one_of(json_values, st.dictionaries(
                        st.sampled_from([k.split(".")[1] for k in CONFIG_KEYS] + ["zzz"]), json_values, max_size=3)),
                    max_size=3).map(lambda d: yaml.safe_dump(d).encode()),
    st.text(max_size=60).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=60),
    st.sampled_from([b"", b"- 1\n- 2\n", b"a: [\n", b"&a [*a]", b"model: !!binary aGk=", b"? [a]\n: 1\n",
                     b"train: {max_steps: 1e400}", b"model:\n  name: [tiny]\n"]),
)


@FUZZ
@given(doc=st.none() | yaml_doc, overrides=st.lists(
    st.tuples(override_key, override_value).map(lambda kv: f"{kv[0]}={kv[1]}") | st.text(max_size=10), max_size=4))
def test_config_parser_never_crashes(doc, overrides):
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        path = None
        if doc is not None:
            path = base / "config.yaml"
            path.write_bytes(doc)
        before = _listing(base)
        cfg = _only_user_errors(lambda: load_config(path, overrides))
        if cfg is not None:
            assert isinstance(cfg, ExperimentConfig)
            assert load_config(None, []).__class__ is type(cfg)
        assert _listing(base) == before
