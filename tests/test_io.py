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
