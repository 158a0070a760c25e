"""Crash safety: damaged checkpoints are reported by name and skipped, and training / pruning
runs killed with SIGKILL at random points (mid-step, mid-checkpoint-write, during set-up) and
resumed until done end bit-identical (CPU, one thread) to uninterrupted runs."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparse_rnnt.errors import UserError
from sparse_rnnt.training.checkpoint import (
    TEST_DELAY_ENV,
    list_checkpoints,
    load_checkpoint,
    load_latest_valid,
    resolve_checkpoint,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ in-process checkpoint checks


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def _three_checkpoints(run: Path, keep: int = 3) -> dict[int, torch.nn.Module]:
    models = {}
    for step in (1, 2, 3):
        models[step] = _model(step)
        save_checkpoint(run, step, models[step], config={"step": step}, keep=keep)
    return models


def _same_weights(ckpt, model: torch.nn.Module) -> bool:
    return all(torch.equal(ckpt.model[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "bad_json", "truncate_json", "no_json"])
def test_damaged_latest_checkpoint_falls_back_by_name(tmp_path, caplog, damage):
    run = tmp_path / "run"
    models = _three_checkpoints(run)
    latest = run / "checkpoints" / "step-0000003"
    target = {"truncate": "model.safetensors", "flip": "state.safetensors", "delete": "model.safetensors",
              "bad_json": "checkpoint.json", "truncate_json": "checkpoint.json", "no_json": "checkpoint.json"}[damage]
    f = latest / target
    data = f.read_bytes()
    if damage in ("truncate", "truncate_json"):
        f.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        f.write_bytes(data[:-1] + bytes([data[-1] ^ 0x01]))
    elif damage == "bad_json":
        f.write_text("{not json")
    else:
        f.unlink()

    with caplog.at_level(logging.WARNING, logger="sparse_rnnt.training.checkpoint"):
        ckpt = load_checkpoint(run)
    assert ckpt.step == 2 and _same_weights(ckpt, models[2])
    assert "step-0000003" in caplog.text and target in caplog.text
    ckpt2, problems = load_latest_valid(run)
    assert ckpt2.step == 2
    assert len(problems) == 1 and "step-0000003" in problems[0] and target in problems[0]
    # An explicitly named checkpoint is never swapped for another one.
    with pytest.raises(UserError, match=target.replace(".", r"\.")):
        load_checkpoint(latest)


def test_every_checkpoint_damaged_lists_all_problems(tmp_path):
    run = tmp_path / "run"
    _three_checkpoints(run)
    for step in (1, 2, 3):
        (run / "checkpoints" / f"step-{step:07d}" / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="no sound checkpoint") as err:
        load_checkpoint(run)
    for step in (1, 2, 3):
        assert f"step-{step:07d}" in str(err.value)


def test_latest_pointer_to_a_missing_checkpoint_falls_back(tmp_path, caplog):
    run = tmp_path / "run"
    models = _three_checkpoints(run)
    (run / "checkpoints" / "latest").write_text("step-0000009\n")
    with caplog.at_level(logging.WARNING, logger="sparse_rnnt.training.checkpoint"):
        ckpt, problems = load_latest_valid(run)
    # The newest complete checkpoint, not the bogus pointer.
    assert ckpt.step == 3 and _same_weights(ckpt, models[3])
    assert any("step-0000009" in p for p in problems)


def test_save_removes_killed_writers_leftovers_and_abandoned_future(tmp_path):
    run = tmp_path / "run"
    _three_checkpoints(run)
    root = run / "checkpoints"
    (root / ".step-0000004.abc123.tmp" / "step-0000004").mkdir(parents=True)
    (root / ".latest.xyz.tmp").write_text("step-0000004\n")
    (root / ".step-0000001.old").mkdir()  # killed between atomic_path's two renames
    # Resumed from step 2 (say step 3 was corrupt): the next save at 3 replaces the abandoned one
    # and the save at step 2 + 1 drops anything later.
    model = _model(7)
    save_checkpoint(run, 3, model, config={}, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000002", "step-0000003"]
    assert _same_weights(load_checkpoint(run), model)
    save_checkpoint(run, 2, model, config={}, keep=1)  # a run rewound to step 2
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002"]


# ------------------------------------------------------------------ kill -9 runs through the CLI


def _dense_sets(manifests: Path) -> list[str]:
    over = {
        "data.manifest_dir": str(manifests), "data.workers": 1, "train.max_steps": 8, "train.log_every": 1,
        "train.eval_every": 0, "train.checkpoint_every": 2, "train.keep_checkpoints": 2, "train.threads": 1,
        "train.progress": False, "batch.max_frames": 400, "model.transformer_num_layers": 2,
        "optim.warmup_steps": 2, "data.dev_max_utterances": 1,
    }
    return [x for k, v in over.items() for x in ("--set", f"{k}={v}")]


def _dense_cmd(manifests: Path, out: Path, resume: bool) -> list[str]:
    return ["train", "--out", str(out), *_dense_sets(manifests), *(["--resume"] if resume else [])]


def _prune_cmd(dense: Path, out: Path, resume: bool) -> list[str]:
    return ["prune", "--method", "adaptive", "--init", str(dense), "--out", str(out), "--levels", "0.2,0.5",
            "--interval", "3", "--adapt-every", "1", "--steps", "7", "--set", "train.checkpoint_every=2",
            *(["--resume"] if resume else [])]


def _env(delay: float = 0.0) -> dict[str, str]:
    env = dict(os.environ)
    env.pop(TEST_DELAY_ENV, None)
    if delay:
        env[TEST_DELAY_ENV] = str(delay)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _launch(args: list[str], log_path: Path, delay: float = 0.0) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("wb")
    try:
        return subprocess.Popen([sys.executable, "-m", "sparse_rnnt.cli", *args], cwd=REPO, env=_env(delay),
                                stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()  # the child holds its own descriptor


def _train_rows(out: Path, after_step: int) -> int:
    """Training rows this attempt logged: steps past the checkpoint it started from (a resume
    first drops the rows the killed attempt logged past it, see trainer._rewind_metrics)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    n = 0
    for line in path.read_bytes().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # being written
        n += "loss" in row and row.get("step", 0) > after_step
    return n


# Wall-clock bounds of one attempt; SPARSE_RNNT_TEST_TIME_SCALE stretches them on a loaded machine.
_TIME_SCALE = float(os.environ.get("SPARSE_RNNT_TEST_TIME_SCALE", "1") or 1)


def _tmp_dirs(out: Path) -> set[str]:
    root = out / "checkpoints"
    return {p.name for p in root.iterdir() if p.name.endswith(".tmp")} if root.is_dir() else set()


def _run_until(out: Path, make_cmd, kill: tuple, log_path: Path) -> bool:
    """One attempt (resuming if the run has a checkpoint); SIGKILL it when ``kill`` happens.
    Returns True when the process was killed, False when it finished first."""
    resume = bool(list_checkpoints(out))
    start_step = int(list_checkpoints(out)[-1].name.split("-")[1]) if resume else 0
    before = _tmp_dirs(out)
    kind = kill[0]
    proc = _launch(make_cmd(out, resume), log_path, delay=2.0 if kind == "write" else 0.0)
    start = time.monotonic()
    try:
        while proc.poll() is None:
            elapsed = time.monotonic() - start
            assert elapsed < 90 * _TIME_SCALE, f"attempt hung: {log_path.read_text(errors='replace')[-2000:]}"
            if (kind == "time" and elapsed >= kill[1]) or (kind == "rows" and _train_rows(out, start_step) >= kill[1]) \
                    or (kind == "write" and _tmp_dirs(out) - before) \
                    or (kind == "ckpts" and len(list_checkpoints(out)) >= kill[1]):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log_path.read_text(errors="replace")[-3000:]
    return False


def _finish(out: Path, make_cmd, log_path: Path) -> None:
    proc = _launch(make_cmd(out, bool(list_checkpoints(out))), log_path)
    try:
        code = proc.wait(timeout=120 * _TIME_SCALE)
    except subprocess.TimeoutExpired:
        proc.kill()  # never leave a run behind
        proc.wait()
        raise AssertionError(f"run did not finish: {log_path.read_text(errors='replace')[-3000:]}") from None
    assert code == 0, log_path.read_text(errors="replace")[-3000:]


def _assert_identical(a_dir: Path, b_dir: Path) -> None:
    a, b = load_checkpoint(a_dir), load_checkpoint(b_dir)
    assert a.step == b.step
    assert a.model.keys() == b.model.keys()
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    # Optimizer moments, RNG states, and (pruning) masks, theta0 and scores: all bit-identical.
    assert a.state_tensors.keys() == b.state_tensors.keys()
    for k in a.state_tensors:
        assert torch.equal(a.state_tensors[k], b.state_tensors[k]), k
    for key in ("sampler", "scheduler", "pruner"):
        assert a.meta["extra"].get(key) == b.meta["extra"].get(key), key


def _damage_latest(out: Path) -> str | None:
    """Truncate the model file of the checkpoint a resume would use (when another one exists)."""
    if len(list_checkpoints(out)) < 2:
        return None
    latest = resolve_checkpoint(out)
    f = latest / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    return latest.name


def _kill_and_resume(out: Path, make_cmd, plan: list[tuple], logs: Path) -> list[str]:
    """Apply ``plan`` (kill points and damage), then resume to the end. Returns what happened."""
    logs.mkdir(parents=True, exist_ok=True)
    events = []
    for i, step in enumerate(plan):
        log_path = logs / f"attempt-{i}.log"
        if step[0] == "damage":
            if len(list_checkpoints(out)) < 2:  # make sure there is one to fall back to
                _run_until(out, make_cmd, ("ckpts", 2), logs / f"attempt-{i}-pre.log")
            name = _damage_latest(out)
            events.append(f"damaged {name}" if name else "no damage")
            if name is not None:
                # The next attempt must say which checkpoint it skipped and why, then go on.
                killed = _run_until(out, make_cmd, ("rows", 1), log_path)
                text = log_path.read_text(errors="replace")
                assert name in text and "model.safetensors" in text, text[-2000:]
                events.append("resumed past it" + (" (killed)" if killed else " (finished)"))
            continue
        if step[0] == "write":
            killed = _run_until(out, make_cmd, step, log_path)
            if killed:
                assert _tmp_dirs(out), "expected a half-written checkpoint directory"
            events.append(f"write: {'killed mid-write' if killed else 'finished'}")
            continue
        killed = _run_until(out, make_cmd, step, log_path)
        events.append(f"{step}: {'killed' if killed else 'finished'}")
    _finish(out, make_cmd, logs / "final.log")
    assert not _tmp_dirs(out), _tmp_dirs(out)
    return events


def _plan(rng: random.Random, long: bool) -> list[tuple]:
    plan: list[tuple] = [("time", rng.uniform(0.3, 2.5)), ("write",), ("damage",)]
    if long:
        plan += [("rows", rng.randint(1, 3)), ("time", rng.uniform(1.0, 4.0)), ("write",), ("rows", rng.randint(1, 3))]
    return plan


@pytest.fixture(scope="module")
def dense_reference(tiny_manifests, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crash") / "dense-ref"
    _finish(out, lambda o, r: _dense_cmd(tiny_manifests, o, r), out.parent / "dense-ref.log")
    return out


def _check_dense(seed: int, long: bool, tiny_manifests: Path, dense_reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "dense"
    events = _kill_and_resume(out, lambda o, r: _dense_cmd(tiny_manifests, o, r), _plan(random.Random(seed), long),
                              tmp_path / "logs")
    assert any(e.startswith("damaged step-") for e in events), events
    _assert_identical(dense_reference, out)
    assert json.loads((out / "data_report.json").read_text()) == json.loads(
        (dense_reference / "data_report.json").read_text())


def _check_prune(seed: int, long: bool, dense_reference: Path, tmp_path: Path) -> None:
    ref = tmp_path / "prune-ref"
    _finish(ref, lambda o, r: _prune_cmd(dense_reference, o, r), tmp_path / "prune-ref.log")
    out = tmp_path / "prune"
    rng = random.Random(seed)
    plan: list[tuple] = [("rows", rng.randint(1, 3)), ("write",)]
    if long:
        plan += [("time", rng.uniform(0.5, 3.0)), ("damage",), ("rows", 1)]
    _kill_and_resume(out, lambda o, r: _prune_cmd(dense_reference, o, r), plan, tmp_path / "logs")
    _assert_identical(ref, out)
    a = load_checkpoint(ref)
    assert a.meta["extra"]["pruner"]  # the masks compared above are a pruned run's


# 31 s: the adaptive run below is killed mid-write by default too; make test-slow runs this one
# (and the many-kill-point runs, dense ones included).
@pytest.mark.slow
def test_killed_dense_training_resumes_bit_exactly(tiny_manifests, dense_reference, tmp_path):
    _check_dense(0, False, tiny_manifests, dense_reference, tmp_path)


def test_killed_adaptive_pruning_resumes_bit_exactly(dense_reference, tmp_path):
    _check_prune(0, False, dense_reference, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_killed_runs_resume_bit_exactly_many_kill_points(seed, tiny_manifests, dense_reference, tmp_path):
    _check_dense(seed, True, tiny_manifests, dense_reference, tmp_path / "d")
    _check_prune(seed, True, dense_reference, tmp_path / "p")
