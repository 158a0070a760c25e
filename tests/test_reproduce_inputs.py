"""sparse-rnnt reproduce: inputs are checked before ``--out`` exists; test WERs are cached under
``--out`` (never in ``--dense``), keyed by everything that determines them."""

import json
import math
import shutil
from pathlib import Path

import pytest

import sparse_rnnt.training.inference as inference
from sparse_rnnt.cli import main
from sparse_rnnt.errors import UserError
from sparse_rnnt.reproduce import (
    ReproduceOptions,
    _score,
    check_inputs,
    run_reproduce,
    score_cache_path,
    score_key,
)
from sparse_rnnt.training.checkpoint import list_checkpoints, load_checkpoint
from tests.training.run_fixture import train_tiny_dense


@pytest.fixture(scope="module")
def dense(tiny_manifests, tmp_path_factory):
    """A dense en+fr run directory (2 steps)."""
    return train_tiny_dense(tiny_manifests, tmp_path_factory.mktemp("repro_inputs") / "dense", steps=2)


def _opts(out, **kw):
    kw = {"scenario": 1, "budget": 4, "levels": (0.2, 0.5), "seeds": (0,), "threads": 1, "device": "cpu",
          "progress": False, **kw}
    return ReproduceOptions(out=out, **kw)


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def _refuses(opts, match):
    """run_reproduce raises a UserError matching ``match`` and leaves no ``--out`` behind."""
    assert not opts.out.exists()
    with pytest.raises(UserError, match=match):
        run_reproduce(opts)
    assert not opts.out.exists()


@pytest.mark.parametrize("lr", [math.nan, math.inf, -math.inf, 0.0, -1e-3])
def test_bad_lr_is_a_user_error(tmp_path, dense, lr):
    with pytest.raises(UserError, match="--lr must be a finite positive number"):
        _opts(tmp_path / "o", dense=dense, lr=lr).validate()
    _refuses(_opts(tmp_path / "o", dense=dense, lr=lr), "--lr")


@pytest.mark.parametrize("seeds", [(-1,), (0, -3), (0, 0), (2**32,)])
def test_bad_seeds_are_a_user_error(tmp_path, dense, seeds):
    _refuses(_opts(tmp_path / "o", dense=dense, seeds=seeds), "--seeds")


def test_cli_bad_seeds_and_lr_exit_2_without_out(tmp_path, dense, capsys):
    out = tmp_path / "o"
    for extra in (["--seeds=-1,0"], ["--lr", "nan"], ["--lr", "inf"], ["--lr", "0"]):
        try:  # argparse's own type checks exit 2 by SystemExit, ours return 2
            code = main(["reproduce", "--scenario", "1", "--out", str(out), "--dense", str(dense), "--quiet", *extra])
        except SystemExit as e:
            code = e.code
        assert code == 2, extra
        err = capsys.readouterr().err
        assert "Traceback" not in err and ("--seeds" in err or "--lr" in err), err
        assert not out.exists(), extra


def test_missing_dense_leaves_no_out(tmp_path):
    _refuses(_opts(tmp_path / "o", dense=tmp_path / "nope"), "checkpoint not found")


def test_pruned_dense_leaves_no_out(tmp_path, dense):
    # A copy of the dense checkpoint whose metadata says it was pruned (re-hashed, so it loads).
    from sparse_rnnt.training.checkpoint import _meta_digest

    src = list_checkpoints(dense)[-1]
    pruned = tmp_path / "pruned" / src.name
    shutil.copytree(src, pruned)
    meta = json.loads((pruned / "checkpoint.json").read_text())
    meta["extra"]["pruner"] = {"method": "imp", "level": 0.5}
    meta["meta_sha256"] = _meta_digest(meta)
    (pruned / "checkpoint.json").write_text(json.dumps(meta))
    _refuses(_opts(tmp_path / "o", dense=pruned), "this one is pruned")


def test_missing_data_leaves_no_out(tmp_path, dense):
    _refuses(_opts(tmp_path / "o", dense=dense, data=tmp_path / "no-manifests"), "not a manifest directory")


def test_data_without_dense_leaves_no_out(tmp_path, tiny_manifests):
    _refuses(_opts(tmp_path / "o", data=tiny_manifests), "--data without --dense")


def test_unknown_language_leaves_no_out(tmp_path, dense):
    _refuses(_opts(tmp_path / "o", dense=dense, languages=("it",)), "not trained on it")


def test_scenario2_on_model_without_nl_leaves_no_out(tmp_path, dense):
    _refuses(_opts(tmp_path / "o", scenario=2, dense=dense), "not trained on nl")


def test_manifests_without_a_language_leave_no_out(tmp_path, dense, tiny_manifests):
    data = tmp_path / "en-only"
    shutil.copytree(tiny_manifests, data)
    lines = (data / "test.jsonl").read_text().splitlines()
    (data / "test.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["language"] == "en"))
    _refuses(_opts(tmp_path / "o", dense=dense, data=data), "no utterances for fr")


def test_out_that_is_a_file_is_refused(tmp_path, dense):
    out = tmp_path / "o"
    out.write_text("mine")
    with pytest.raises(UserError, match="not a directory"):
        run_reproduce(_opts(out, dense=dense))
    assert out.read_text() == "mine"


def test_demo_dir_that_is_not_a_demo_is_refused_untouched(tmp_path):
    out = tmp_path / "o"
    (out / "demo").mkdir(parents=True)
    (out / "demo" / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not a demo output"):
        run_reproduce(_opts(out))
    assert (out / "demo" / "keep.txt").read_text() == "precious"


def test_valid_inputs_are_accepted(dense, tiny_manifests, tmp_path):
    inputs = check_inputs(_opts(tmp_path / "o", dense=dense))
    assert inputs.languages == ["en", "fr"] and inputs.manifests == tiny_manifests
    assert inputs.dense.path == list_checkpoints(dense)[-1]
    assert not (tmp_path / "o").exists()


def test_score_cache_lives_in_out_and_is_keyed(dense, tiny_manifests, tmp_path, monkeypatch):
    calls = []
    real = inference.evaluate_checkpoint

    def spy(*args, **kw):
        calls.append(kw["limit"])
        return real(*args, **kw)

    monkeypatch.setattr(inference, "evaluate_checkpoint", spy)
    ckpt = load_checkpoint(dense)
    before = _snapshot(dense)
    out = tmp_path / "o"
    one = _opts(out, dense=dense, eval_limit=1)
    w1 = _score(ckpt, tiny_manifests, "en", one)
    cache = score_cache_path(out, score_key(ckpt, tiny_manifests, "en", one))
    assert cache.parent == out / "scores" and cache.is_file()
    assert json.loads(cache.read_text())["wer"] == w1 and calls == [1]

    # Same key: the cached score is used (a planted value proves it is read, not recomputed).
    saved = json.loads(cache.read_text())
    cache.write_text(json.dumps({**saved, "wer": 0.123}))
    assert _score(ckpt, tiny_manifests, "en", one) == 0.123 and calls == [1]

    # Another eval limit, another manifest directory, another language: scored again.
    two = _opts(out, dense=dense, eval_limit=2)
    assert _score(ckpt, tiny_manifests, "en", two) != 0.123 and calls == [1, 2]
    data = tmp_path / "other-manifests"
    shutil.copytree(tiny_manifests, data)
    assert _score(ckpt, data, "en", one) != 0.123 and calls == [1, 2, 1]
    _score(ckpt, tiny_manifests, "fr", one)
    assert calls == [1, 2, 1, 1]
    # Changed test manifest in place: its hash is part of the key.
    lines = (data / "test.jsonl").read_text().splitlines()
    (data / "test.jsonl").write_text("".join(x + "\n" for x in reversed(lines)))
    _score(ckpt, data, "en", one)
    assert calls == [1, 2, 1, 1, 1]
    assert len(list((out / "scores").iterdir())) == 5

    # Nothing was written into the dense checkpoint's directory.
    assert _snapshot(dense) == before
    assert not list(dense.rglob("test_wer*"))


def test_score_key_names_the_exact_checkpoint(dense, tiny_manifests, tmp_path):
    ckpt = load_checkpoint(dense)
    opts = _opts(tmp_path / "o", dense=dense)
    key = score_key(ckpt, tiny_manifests, "en", opts)
    assert key["checkpoint"] == str(list_checkpoints(dense)[-1].resolve()) and key["step"] == 2
    assert key["checkpoint_sha256"]["model.safetensors"] == ckpt.meta["sha256"]["model.safetensors"]
    assert key["manifests"] == str(tiny_manifests.resolve())
    assert (key["eval_limit"], key["language"], key["decoding"]) == (0, "en", "greedy")
    # A copy of the checkpoint elsewhere is another key (resolved path), same weights hash.
    copy = tmp_path / "copy" / ckpt.path.name
    shutil.copytree(ckpt.path, copy)
    other = score_key(load_checkpoint(copy), tiny_manifests, "en", opts)
    assert other["checkpoint"] != key["checkpoint"]
    assert score_cache_path(opts.out, other) != score_cache_path(opts.out, key)


# 29 s end to end; test_score_cache_lives_in_out_and_is_keyed checks the cache keys by default.
@pytest.mark.slow
def test_reproduce_rescores_on_new_eval_limit_and_reuses_runs(dense, tiny_manifests, tmp_path, monkeypatch):
    """End to end (1 language, 4-step runs): nothing is written into --dense; a second call with
    another --eval-limit trains nothing again but scores every model again."""
    before = _snapshot(dense)
    opts = _opts(tmp_path / "o", dense=dense, languages=("en",), eval_limit=1)
    table = run_reproduce(opts)
    assert _snapshot(dense) == before
    n_models = len({r for row in table["rows"] for r in row["runs"]}) + 1  # + dense
    assert len(list((opts.out / "scores").glob("en-*.json"))) == n_models
    stamps = {p: p.stat().st_mtime_ns for p in (opts.out / "seed-0").glob("*/checkpoints/latest")}
    assert len(stamps) == 7

    limits = []
    real = inference.evaluate_checkpoint
    monkeypatch.setattr(inference, "evaluate_checkpoint", lambda *a, **kw: limits.append(kw["limit"]) or real(*a, **kw))
    run_reproduce(opts)  # same inputs: every score comes from the cache
    assert limits == []
    again = run_reproduce(_opts(tmp_path / "o", dense=dense, languages=("en",), eval_limit=3))
    assert limits == [3] * n_models
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # finished runs reused
    assert len(list((opts.out / "scores").glob("en-*.json"))) == 2 * n_models
    assert _snapshot(dense) == before
    # The dense row is the dense model's WER on the first 3 test utterances, not the stale 1-utterance one.
    ref, _ = real(dense, tiny_manifests, split="test", languages=["en"], device="cpu", progress=False, limit=3)
    assert again["rows"][0]["wer"]["en"]["mean"] == pytest.approx(100 * ref.per_language["en"].wer)


@pytest.mark.parametrize("where", ["dense", "inside-dense", "checkpoints", "link-into-dense", "data", "config-data"])
def test_out_in_dense_or_manifests_is_refused(tmp_path, dense, tiny_manifests, where):
    # reproduce never writes into its inputs: not into --dense (as given, its run, its
    # checkpoint folder, through a symlink) nor into the manifest directory (--data or the
    # one the dense config names).
    link = tmp_path / "link"
    link.symlink_to(dense, target_is_directory=True)
    out, data, match = {
        "dense": (dense, None, "the --dense run"),
        "inside-dense": (dense / "rep", None, "the --dense run"),
        "checkpoints": (dense / "checkpoints" / "rep", None, "the --dense run"),
        "link-into-dense": (link / "rep", None, "the --dense run"),
        "data": (tiny_manifests / "rep", tiny_manifests, "the manifest directory"),
        "config-data": (tiny_manifests / "rep", None, "the manifest directory"),
    }[where]
    before, manifests = _snapshot(dense), _snapshot(tiny_manifests)
    with pytest.raises(UserError, match=f"--out .* is, or is inside, {match}"):
        run_reproduce(_opts(out, dense=dense, data=data))
    assert _snapshot(dense) == before and _snapshot(tiny_manifests) == manifests


@pytest.fixture(scope="module")
def lap_run(dense, tmp_path_factory):
    """A reproduce --out holding one finished run (scenario 2's LAP over en+fr, seed 0)."""
    from sparse_rnnt.reproduce import _run_config, _train, plan

    opts = _opts(tmp_path_factory.mktemp("repro_reuse") / "o", scenario=2, dense=dense, languages=("en", "fr"))
    inputs = check_inputs(opts)
    runs, _ = plan(opts, inputs.languages)
    dirs = {r.name: opts.out / "seed-0" / r.name for r in runs}
    lap = next(r for r in runs if r.name == "lap")
    _train(_run_config(opts, inputs.dense.config, lap, 0, dirs, inputs.manifests), dirs["lap"], inputs.dense,
           opts.budget)
    assert list_checkpoints(dirs["lap"])
    return opts


def test_finished_run_is_reused_only_with_the_same_settings(lap_run, dense, tiny_manifests, tmp_path, monkeypatch):
    from dataclasses import replace

    opts = lap_run
    check_inputs(opts)  # same settings: reused
    # Runtime settings and another spelling of the same paths are the same run.
    monkeypatch.chdir(opts.out.parent)
    check_inputs(replace(opts, out=Path(opts.out.name), progress=True, threads=2, data=tiny_manifests))
    other_dense = tmp_path / "dense-copy"
    shutil.copytree(dense, other_dense)
    other_data = tmp_path / "manifests-copy"
    shutil.copytree(tiny_manifests, other_data)
    cases = {
        "optim.lr": {"lr": 0.05},
        "data.languages": {"languages": ("en",)},
        "pruning.levels": {"levels": (0.3, 0.5)},  # (--adapt-every has one legal value at this budget)
        "dense checkpoint": {"dense": other_dense},
        "data.manifest_dir": {"data": other_data},
        "train.max_steps": {"budget": 6},
    }
    before = _snapshot(opts.out)
    for key, change in cases.items():
        with pytest.raises(UserError, match=rf"seed-0/lap was trained with other settings.*{key} \(run .*, now "
                                            r".*choose another --out \(or delete .*seed-0/lap\)") as e:
            run_reproduce(replace(opts, **change))
        assert "\n" not in str(e.value), key
        assert _snapshot(opts.out) == before, key  # refused before anything was trained or scored
    with pytest.raises(UserError, match="cannot be extended to a larger --budget"):
        check_inputs(replace(opts, budget=6))


def test_run_from_a_replaced_dense_checkpoint_is_refused(lap_run, tmp_path):
    # Same path, other files (a dense run retrained in place): the run's record of the dense
    # checkpoint's hashes tells them apart.
    record = lap_run.out / "seed-0" / "lap" / ".reproduce-init.json"
    saved = record.read_text()
    try:
        tree = json.loads(saved)
        tree["sha256"]["model.safetensors"] = "0" * 64
        record.write_text(json.dumps(tree))
        with pytest.raises(UserError, match=r"dense checkpoint .*with other file hashes"):
            check_inputs(lap_run)
        # A run without the record (made by an older version): the path the Trainer records counts.
        record.unlink()
        check_inputs(lap_run)
    finally:
        record.write_text(saved)
