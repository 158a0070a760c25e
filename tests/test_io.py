import os
import stat

import pytest

from sparse_rnnt.io import atomic_path, atomic_write_json, atomic_write_text


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert os.listdir(p.parent) == ["a.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert _mode(p) == 0o666 & ~umask


def test_atomic_write_json_is_sorted_and_readable(tmp_path):
    atomic_write_json(tmp_path / "x.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "x.json").read_text().index('"a"') < (tmp_path / "x.json").read_text().index('"b"')


def test_atomic_path_failure_keeps_old_and_cleans_up(tmp_path):
    target = tmp_path / "out"
    with atomic_path(target) as t:
        t.mkdir()
        (t / "f").write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as t:
        t.mkdir()
        (t / "f").write_text("half")
        raise RuntimeError("boom")
    assert (target / "f").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # success replaces the directory whole
    with atomic_path(target) as t:
        t.mkdir()
        (t / "g").write_text("new")
    assert sorted(os.listdir(target)) == ["g"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_atomic_path_never_touches_a_sibling_named_like_a_backup(tmp_path):
    # ".out.old" is a user's folder here; replacing "out" must not delete it.
    (tmp_path / "out").mkdir()
    (tmp_path / ".out.old").mkdir()
    (tmp_path / ".out.old" / "precious.txt").write_text("keep me")
    with atomic_path(tmp_path / "out") as t:
        t.mkdir()
        (t / "new").write_text("x")
    assert (tmp_path / ".out.old" / "precious.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == [".out.old", "out"]
    assert os.listdir(tmp_path / "out") == ["new"]


def test_atomic_path_requires_output(tmp_path):
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "nothing"):
        pass
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_atomic_path_interrupted_between_its_two_renames_keeps_the_old_output(tmp_path, monkeypatch, kind):
    # Fault injection: Ctrl-C after the old directory was moved aside, before the new one landed.
    # The cleanup used to delete the temporary folder holding both.
    import sparse_rnnt.io as io

    target = tmp_path / "out"
    with atomic_path(target) as t:
        if kind == "dir":
            t.mkdir()
            (t / "old.txt").write_text("previous good output")
        else:
            t.write_text("previous good output")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == (2 if kind == "dir" else 1):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as t:
        if kind == "dir":
            t.mkdir()
            (t / "new.txt").write_text("new output")
        else:
            t.write_text("new output")
    monkeypatch.setattr(io.os, "replace", real)
    kept = target / "old.txt" if kind == "dir" else target
    assert kept.read_text() == "previous good output"
    assert sorted(os.listdir(tmp_path)) == ["out"]
