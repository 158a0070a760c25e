"""sparse-rnnt demo: every option is checked before ``--out`` is touched, and ``--force`` only
replaces a directory the demo wrote."""

import json
import math

import pytest

import sparse_rnnt.demo as demo
from sparse_rnnt.cli import main
from sparse_rnnt.demo import DEMO_MARKER, DemoOptions, run_demo, validate_options
from sparse_rnnt.errors import UserError

BAD = [
    ({"hours": math.nan}, "--hours"), ({"hours": math.inf}, "--hours"), ({"hours": 0.0}, "--hours"),
    ({"hours": -1.0}, "--hours"), ({"steps": 0}, "--steps"), ({"steps": -5}, "--steps"),
    ({"steps": 2.5}, "--steps"), ({"seed": -1}, "--seed"), ({"seed": 2**32}, "--seed"),
]


def _user_dir(tmp_path):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("precious")
    (out / "sub" / "data.bin").write_bytes(b"\0\1")
    return out


def _contents(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def fake_pipeline(monkeypatch):
    """Replace the (minutes long) pipeline: record what it saw, write a summary like the real one."""
    seen = []

    def fake(opts, out, hours, steps, synth_config, cfg):
        seen.append((sorted(p.name for p in out.iterdir()), hours, steps, cfg.train.seed))
        (out / "demo_summary.json").write_text(json.dumps({"ok": True}))
        return {"ok": True}

    monkeypatch.setattr(demo, "_pipeline", fake)
    return seen


@pytest.mark.parametrize(("bad", "match"), BAD)
def test_bad_option_with_force_leaves_user_dir_untouched(tmp_path, bad, match, fake_pipeline):
    out = _user_dir(tmp_path)
    before = _contents(out)
    with pytest.raises(UserError, match=match):
        run_demo(DemoOptions(out=out, force=True, progress=False, **bad))
    assert _contents(out) == before and (out / "keep.txt").read_text() == "precious"
    assert fake_pipeline == []


@pytest.mark.parametrize(("bad", "match"), BAD)
def test_bad_option_with_force_keeps_a_demo_output(tmp_path, bad, match, fake_pipeline):
    """Even a replaceable (demo) directory is not deleted when another option is wrong."""
    out = tmp_path / "old-demo"
    out.mkdir()
    (out / DEMO_MARKER).write_text("")
    (out / "corpus").mkdir()
    with pytest.raises(UserError, match=match):
        run_demo(DemoOptions(out=out, force=True, progress=False, **bad))
    assert (out / "corpus").is_dir()


@pytest.mark.parametrize(("bad", "match"), BAD)
def test_bad_option_creates_no_out(tmp_path, bad, match):
    out = tmp_path / "new"
    with pytest.raises(UserError, match=match):
        run_demo(DemoOptions(out=out, progress=False, **bad))
    assert not out.exists()


def test_cli_bad_options_exit_2_and_keep_the_directory(tmp_path, capsys):
    out = _user_dir(tmp_path)
    before = _contents(out)
    for extra in (["--steps", "0"], ["--seed", "-1"], ["--hours", "nan"], ["--hours", "inf"], []):
        try:  # argparse's own type checks exit 2 by SystemExit, ours return 2
            code = main(["demo", "--out", str(out), "--force", "--quiet", *extra])
        except SystemExit as e:
            code = e.code
        assert code == 2, extra
        err = capsys.readouterr().err
        assert "Traceback" not in err and "error" in err, extra
        assert _contents(out) == before, extra


def test_force_refuses_a_non_demo_directory(tmp_path, fake_pipeline):
    out = _user_dir(tmp_path)
    before = _contents(out)
    with pytest.raises(UserError, match="not a demo output"):
        run_demo(DemoOptions(out=out, force=True, progress=False, steps=3, hours=0.01))
    assert _contents(out) == before and fake_pipeline == []
    with pytest.raises(UserError, match="--force"):  # without --force: the old message
        run_demo(DemoOptions(out=out, progress=False))
    assert _contents(out) == before


def test_out_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "f"
    out.write_text("mine")
    with pytest.raises(UserError, match="not a directory"):
        run_demo(DemoOptions(out=out, force=True, progress=False))
    assert out.read_text() == "mine"


@pytest.mark.parametrize("marker", [DEMO_MARKER, "demo_summary.json"])
def test_force_replaces_a_demo_output(tmp_path, fake_pipeline, marker):
    out = tmp_path / "d"
    (out / "run").mkdir(parents=True)
    (out / marker).write_text("{}")
    (out / "stale.txt").write_text("old")
    run_demo(DemoOptions(out=out, force=True, progress=False, steps=7, hours=0.25, seed=3))
    # The pipeline starts in a fresh directory holding only the marker, with the options given.
    assert fake_pipeline == [([DEMO_MARKER], 0.25, 7, 3)]
    assert not (out / "stale.txt").exists() and not (out / "run").exists()
    # What this demo wrote can be replaced again.
    run_demo(DemoOptions(out=out, force=True, progress=False, steps=7, hours=0.25))
    assert len(fake_pipeline) == 2


def test_empty_dir_is_used_without_force(tmp_path, fake_pipeline):
    out = tmp_path / "empty"
    out.mkdir()
    run_demo(DemoOptions(out=out, progress=False, steps=2, hours=0.01))
    assert fake_pipeline[0][0] == [DEMO_MARKER] and (out / "demo_summary.json").is_file()


def test_user_error_during_the_run_leaves_no_partial_output(tmp_path, monkeypatch):
    def failing(opts, out, *rest):
        (out / "corpus").mkdir()
        raise UserError("eSpeak NG is not installed")

    monkeypatch.setattr(demo, "_pipeline", failing)
    new = tmp_path / "new"
    with pytest.raises(UserError, match="eSpeak"):
        run_demo(DemoOptions(out=new, progress=False))
    assert not new.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="eSpeak"):
        run_demo(DemoOptions(out=empty, progress=False))
    assert empty.is_dir() and not any(empty.iterdir())


def test_validate_options_defaults_and_values(tmp_path):
    assert validate_options(DemoOptions(out=tmp_path / "x")) == (demo.DEMO_HOURS, demo.DEMO_STEPS)
    assert validate_options(DemoOptions(out=tmp_path / "x", hours=1, steps=5, seed=2**32 - 1)) == (1.0, 5)
    with pytest.raises(UserError, match="--steps"):
        validate_options(DemoOptions(out=tmp_path / "x", steps=True))
    assert not (tmp_path / "x").exists()
