"""Fuzzing the readers of untrusted input: the MLS corpus reader, the artifact loader and the
config parser. Property: every input either loads or raises :class:`UserError` (never another
exception, which the CLI would show as a traceback), and nothing is written outside the output
directory: an audit hook (tests/fuzz_support.py) records every write while the code under test
runs, and the sandbox holding the inputs is also listed before and after (for C-level writes)."""

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
from sparse_rnnt.data.manifest import SPLITS
from sparse_rnnt.data.mls import ReadReport, read_mls, write_manifests
from sparse_rnnt.data.tokenizer import Tokenizer, TokenizerConfig
from sparse_rnnt.errors import UserError
from sparse_rnnt.export import ExportOptions, export_checkpoint, load_artifact
from sparse_rnnt.model.rnnt import build_model
from sparse_rnnt.training.checkpoint import save_checkpoint
from tests.fuzz_support import confined_writes

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


def _flac_bytes(n: int = 1600, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, (0.2 * np.sin(np.arange(n) / 7)).astype(np.float32), rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


GOOD_FLAC = _flac_bytes()
IDS = ["1_2_3", "1_2_4", "10_20_000001", "7_8_9"]

line_strategy = st.one_of(
    st.tuples(st.sampled_from(IDS), st.text(max_size=15)).map(lambda t: f"{t[0]}\t{t[1]}".encode()),
    # well formed, so that some utterances get as far as their audio
    st.tuples(st.sampled_from(IDS), st.text("abc '", min_size=1, max_size=8)).map(lambda t: f"{t[0]}\t{t[1]}x".encode()),
    st.text(max_size=25).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=25),
    st.sampled_from([b"", b"\t", b"1_2_3", b"\tno id", b"../x_y_z\ttext", b"a/b_c_d\tx", b"1_2_3\t\xff\xfe",
                     b"\xef\xbb\xbf1_2_3\tbom", b"1_2_3\ttext\r", b"1_2_3\t" + b"a" * 300]),
)
audio_strategy = st.one_of(
    st.just(("good", b"")), st.just(("good", b"")), st.just(("missing", b"")), st.just(("dir", b"")),
    st.sampled_from([("bytes", _flac_bytes(rate=8000)), ("bytes", _flac_bytes(0))]),  # wrong rate, no samples
    st.binary(max_size=64).map(lambda b: ("bytes", b)),
    st.integers(1, len(GOOD_FLAC) - 1).map(lambda n: ("truncated", GOOD_FLAC[:n])),
)


MLS_DIRS = ("mls_english", "mls_french")

# One split folder of one language: its transcripts, audio files and segments.
split_content = st.fixed_dictionaries({
    "transcripts": st.sampled_from(["file"] * 4 + ["dir", "missing"]),
    "lines": st.lists(line_strategy, min_size=1, max_size=6),  # blank/empty transcripts: b"" lines
    "audio": st.dictionaries(st.sampled_from(IDS), audio_strategy, max_size=4),  # the others: good
    "segments": st.none() | st.binary(max_size=60) | st.lists(line_strategy, max_size=3).map(b"\n".join),
})


@st.composite
def mls_corpora(draw) -> dict[str, Any]:
    """A corpus holding every split the example requests (so the reader meets the malformed
    content instead of stopping at "split not found"); only its transcripts may be absent."""
    splits = tuple(draw(st.lists(st.sampled_from(SPLITS), min_size=1, max_size=3)))  # repeats: reader dedups
    dirs = draw(st.lists(st.sampled_from(MLS_DIRS), min_size=1, max_size=2, unique=True))
    content = {(d, s): draw(split_content) for d in dirs for s in dict.fromkeys(splits)}
    for s in splits:  # absent in one language is a counted problem, everywhere a request error
        if all(content[d, s]["transcripts"] != "file" for d in dirs):
            content[dirs[0], s] = {**content[dirs[0], s], "transcripts": "file"}
    return {
        "splits": splits,
        "content": content,
        "subset": draw(st.sampled_from([None, None, "9hr", "1hr"])),
        # None: the subset's handles file is missing (fatal: the one request error left in)
        "handles": draw(st.none() | st.binary(max_size=40)
                        | st.lists(st.sampled_from(IDS), max_size=3).map(lambda ids: "\n".join(ids).encode())
                        | st.lists(st.sampled_from(IDS), min_size=1, max_size=4).map(lambda ids: "\n".join(ids).encode())),
        "check_audio": draw(st.booleans()),
    }


def _build_mls(root: Path, corpus: dict[str, Any]) -> None:
    for (lang_dir, split), c in corpus["content"].items():
        split_dir = root / lang_dir / split
        split_dir.mkdir(parents=True)
        transcripts = split_dir / "transcripts.txt"
        if c["transcripts"] == "file":
            transcripts.write_bytes(b"\n".join(c["lines"]))
        elif c["transcripts"] == "dir":
            transcripts.mkdir()
        for utt_id in IDS:
            if utt_id not in c["audio"] and utt_id.encode() not in b"".join(c["lines"]):
                continue  # fewer folders to make and delete: most of the runtime
            kind, data = c["audio"].get(utt_id, ("good", b""))
            spk, book, _ = utt_id.split("_")
            path = split_dir / "audio" / spk / book / f"{utt_id}.flac"
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "good":
                path.write_bytes(GOOD_FLAC)
            elif kind == "dir":
                path.mkdir()
            elif kind != "missing":
                path.write_bytes(data)
        if c["segments"] is not None:
            (split_dir / "segments.txt").write_bytes(c["segments"])
        subset, handles = corpus["subset"], corpus["handles"]
        if split == "train" and subset is not None and handles is not None:
            if subset == "9hr":
                (split_dir / "limited_supervision" / "9hr").mkdir(parents=True)
                (split_dir / "limited_supervision" / "9hr" / "handles.txt").write_bytes(handles)
            else:
                for k in range(6):  # the union of six folds
                    (split_dir / "limited_supervision" / "1hr" / str(k)).mkdir(parents=True)
                    (split_dir / "limited_supervision" / "1hr" / str(k) / "handles.txt").write_bytes(
                        handles if k == 0 else b"")


def test_mls_reader_never_crashes():
    """Malformed transcripts, audio, segments and handles: skipped and counted, never a crash; only
    the manifests' folder is written."""
    stats = {"examples": 0, "read": 0, "utterances": 0, "problems": 0}

    @FUZZ
    @given(corpus=mls_corpora())
    def fuzz(corpus):
        stats["examples"] += 1
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp)
            _build_mls(base / "corpus", corpus)
            work = base / "work"  # write_manifests builds beside its output, then swaps it in
            work.mkdir()
            out = work / "manifests"
            before = _listing(base, skip=work)

            def run() -> None:
                utts, report = read_mls(base / "corpus", splits=corpus["splits"], subset=corpus["subset"],
                                        check_audio=corpus["check_audio"], workers=1, progress=False)
                stats["read"] += 1
                stats["utterances"] += any(utts.values())
                stats["problems"] += report.num_problems > 0
                assert set(utts) == set(corpus["splits"])
                for split_utts in utts.values():
                    for u in split_utts:
                        assert Path(u.audio).is_file() and Path(u.audio).is_relative_to(base / "corpus")
                        assert u.text.strip() and "\n" not in u.text
                assert report.num_ok == sum(len(v) for v in utts.values())
                write_manifests(out, utts, report)
                assert {p.name for p in out.iterdir()} == {f"{s}.jsonl" for s in utts} | {"read_report.json"}

            with confined_writes(work):
                _only_user_errors(run)
            assert _listing(base, skip=work) == before

    fuzz()
    # Fails if the fuzzing turns trivial again (examples stopping at a request check); at 100
    # examples about 96 get through, 60 with utterances.
    n = stats["examples"]
    assert stats["read"] >= 0.5 * n, stats
    assert stats["utterances"] >= 0.2 * n, stats
    assert stats["problems"] >= 0.3 * n, stats


@pytest.fixture
def small_mls(tmp_path) -> Path:
    """One language, train only, one good utterance."""
    split_dir = tmp_path / "corpus" / "mls_english" / "train"
    (split_dir / "audio" / "1" / "2").mkdir(parents=True)
    (split_dir / "audio" / "1" / "2" / "1_2_3.flac").write_bytes(GOOD_FLAC)
    (split_dir / "transcripts.txt").write_text("1_2_3\tthe cat\n")
    return tmp_path / "corpus"


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"splits": ("bogus",)}, "unknown split 'bogus'"),
    ({"splits": ("train", "bogus")}, "unknown split 'bogus'"),
    ({"splits": ()}, "no split given"),
    ({"splits": ("train", "dev")}, "split 'dev' not found"),
    ({"splits": ("test",), "mkdir": "mls_english/test/transcripts.txt"}, "split 'test' not found"),
    ({"subset": "2hr"}, "unknown subset '2hr'"),
    ({"subset": "9hr"}, "handles file not found"),
    ({"fmt": "wav"}, "unknown audio format 'wav'"),
    ({"workers": -1}, "workers must be >= 0"),
    ({"languages": ["fr"]}, "not found under"),
    ({"root": "missing"}, "MLS root not found"),
    ({"root": "mls_english/train/transcripts.txt"}, "not a directory"),
    ({"root": "mls_english"}, "no MLS language directories"),
])
def test_mls_reader_request_errors(small_mls, kwargs, match):
    """Bad requests are fatal, by name; kept out of the fuzzer, whose requests are sound so that
    its malformed data is actually read."""
    kwargs = dict(kwargs)
    root = small_mls / kwargs.pop("root", "")
    if "mkdir" in kwargs:
        (small_mls / kwargs.pop("mkdir")).mkdir(parents=True)
    kwargs = {"splits": ("train",), "workers": 1, **kwargs}
    with confined_writes(), pytest.raises(UserError, match=match):
        read_mls(root, progress=False, **kwargs)
    utts, _ = read_mls(small_mls, splits=("train",), progress=False, workers=1)
    assert [u.id for u in utts["train"]] == ["1_2_3"]  # the corpus itself is sound


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
        with confined_writes():  # loading writes nothing, anywhere
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
        with confined_writes(), pytest.raises(UserError):
            load_artifact(root)


@pytest.mark.parametrize("name", FILE_NAMES)
def test_artifact_loader_random_bytes_in_any_file(artifact_dir, tmp_path, name):
    """Garbage in any file, its hash updated so the parser (not the hash check) meets it."""
    rng = np.random.default_rng(FILE_NAMES.index(name))
    for i, data in enumerate([b"", b"\xff\xfe\x00", rng.bytes(7), rng.bytes(200), b"{}", b"[1]"]):
        root = tmp_path / f"a{i}"
        shutil.copytree(artifact_dir, root)
        _apply_one(root, (name, [], "bytes_rehash", data))
        with confined_writes(), pytest.raises(UserError):
            load_artifact(root)


@pytest.mark.parametrize("value", [0, 1, -2, 10**30, "x", None, [3]])
def test_artifact_loader_bad_num_symbols(artifact_dir, tmp_path, value):
    root = tmp_path / "a"
    shutil.copytree(artifact_dir, root)
    _apply_one(root, ("config.json", ["num_symbols"], "set", value))
    with confined_writes(), pytest.raises(UserError):
        load_artifact(root)


# ------------------------------------------------------------------------------ config parser


def test_config_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_bytes(b"train:\n  max_steps: 3 # \xe9t\xe9\n")  # Latin-1, not UTF-8
    with confined_writes(), pytest.raises(UserError, match=r"config\.yaml"):
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
        with confined_writes():
            cfg = _only_user_errors(lambda: load_config(path, overrides))
        if cfg is not None:
            assert isinstance(cfg, ExperimentConfig)
            assert load_config(None, []).__class__ is type(cfg)
        assert _listing(base) == before


# ------------------------------------------------------------------------------ the write guard


def _symlink(src: Path, dst: Path) -> None:
    os.symlink(src, dst)


# Each writes (or removes) outside ``allowed`` by one audited call; ``outside`` already holds
# ``f.txt`` and the folder ``d``.
STRAY_WRITES: dict[str, Callable[[Path, Path], Any]] = {
    "open_w": lambda allowed, outside: open(allowed / ".." / "outside" / "STRAY.txt", "w").close(),
    "open_r+": lambda allowed, outside: open(outside / "f.txt", "r+").close(),
    "write_bytes": lambda allowed, outside: (outside / "STRAY.txt").write_bytes(b"x"),
    "os_open": lambda allowed, outside: os.close(os.open(outside / "STRAY.txt", os.O_WRONLY | os.O_CREAT)),
    "mkstemp": lambda allowed, outside: os.close(tempfile.mkstemp(dir=outside)[0]),
    "mkdir": lambda allowed, outside: (outside / "STRAY").mkdir(),
    "rename_out": lambda allowed, outside: os.rename(allowed / "in.txt", outside / "STRAY.txt"),
    "replace_in": lambda allowed, outside: os.replace(outside / "f.txt", allowed / "in.txt"),
    "unlink": lambda allowed, outside: (outside / "f.txt").unlink(),
    "rmdir": lambda allowed, outside: (outside / "d").rmdir(),
    "rmtree": lambda allowed, outside: shutil.rmtree(outside / "d"),
    "symlink": lambda allowed, outside: _symlink(allowed / "in.txt", outside / "STRAY"),
    "link": lambda allowed, outside: os.link(allowed / "in.txt", outside / "STRAY"),
    "truncate": lambda allowed, outside: os.truncate(outside / "f.txt", 0),
    "chmod": lambda allowed, outside: os.chmod(outside / "f.txt", 0o600),
    "relative": lambda allowed, outside: Path("outside/STRAY.txt").write_text("x"),  # cwd is tmp_path
    "symlinked_dir": lambda allowed, outside: (allowed / "link_out" / "STRAY.txt").write_text("x"),
}


def _guard_sandbox(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (outside / "d").mkdir(parents=True)
    (outside / "f.txt").write_text("input")
    allowed.mkdir()
    (allowed / "in.txt").write_text("x")
    (allowed / "link_out").symlink_to(outside)  # inside by name, outside in fact
    monkeypatch.chdir(tmp_path)
    return allowed, outside


@pytest.mark.parametrize("how", list(STRAY_WRITES))
def test_write_guard_reports_a_stray_write(tmp_path, monkeypatch, how):
    """The guard must see a write next to (not inside) the allowed folder, however it is made."""
    allowed, outside = _guard_sandbox(tmp_path, monkeypatch)
    with pytest.raises(AssertionError, match="outside the allowed"), confined_writes(allowed):
        STRAY_WRITES[how](allowed, outside)


def test_write_guard_allows_writes_inside(tmp_path, monkeypatch):
    allowed, outside = _guard_sandbox(tmp_path, monkeypatch)
    with confined_writes(allowed) as records:
        assert (outside / "f.txt").read_text() == "input"  # reading outside is fine
        (allowed / "a.txt").write_text("x")
        os.replace(allowed / "a.txt", allowed / "b.txt")
        (allowed / "sub" / "deep").mkdir(parents=True)
        (allowed / "sub" / "deep" / "f").write_text("x")
        shutil.rmtree(allowed / "sub")
        Path("allowed/c.txt").write_text("x")
        write_manifests(allowed / "manifests", {"train": []}, ReadReport())
    assert {e for e, _ in records} >= {"open", "os.rename", "os.mkdir", "shutil.rmtree", "os.remove"}
    assert all(p.startswith(str(allowed.resolve())) for _, p in records)
    with confined_writes() as records:  # nothing allowed, nothing written
        (outside / "f.txt").read_bytes()
    assert records == []
    with pytest.raises(RuntimeError, match="nest"), confined_writes(allowed), confined_writes(allowed):
        pass
