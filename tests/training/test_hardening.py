"""The trainer skips bad data and non-finite steps, as issue #6 asks, end to end."""

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from sparse_rnnt.data.manifest import read_manifest, write_manifest
from sparse_rnnt.errors import UserError
from sparse_rnnt.training.checkpoint import load_checkpoint
from sparse_rnnt.training.trainer import Trainer
from tests.training.run_fixture import nan_loss
from tests.training.test_trainer import _cfg


class _NaNAt(Trainer):
    """Makes the loss NaN on the given (1-based) forward passes, before its backward pass, so the
    gradients are NaN too (what a real NaN loss leaves); records the state around each skipped step."""

    nan_steps: frozenset[int] = frozenset()
    calls = 0

    def _forward_backward(self, shard, language):
        self.calls += 1
        if self.calls not in self.nan_steps:
            return super()._forward_backward(shard, language)
        with nan_loss(self.model):
            return super()._forward_backward(shard, language)

    def _state(self):
        return ({k: v.detach().clone() for k, v in self.model.state_dict().items()},
                copy.deepcopy(self.optimizer.state_dict()), self.scheduler.get_last_lr(), self.step)

    def train_step(self, batch):
        before = self._state()
        stats = super().train_step(batch)
        if stats.get("skipped"):
            self.around_skips = [*getattr(self, "around_skips", []), (before, self._state())]
        return stats


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_nonfinite_steps_are_skipped_and_counted(tiny_manifests, tmp_path):
    cfg = _cfg(tiny_manifests, **{"train.max_steps": 4, "train.checkpoint_every": 4})
    trainer = type("T", (_NaNAt,), {"nan_steps": frozenset({2})})(cfg, tmp_path / "run")
    trainer.run()
    assert trainer.guard.skipped == 1 and trainer.step == 4 and trainer.calls == 5
    # The skipped step changed nothing: weights, Adam's moments and step count, LR, step counter.
    [(before, after)] = trainer.around_skips
    assert before[3] == after[3] == 1
    for i in range(3):
        assert _same(before[i], after[i])
    assert before[1]["state"]  # Adam had state to keep (the step before was a real one)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)  # no NaN logged
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.meta["extra"]["loss_guard"]["skipped"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt.model.values())


def test_too_many_nonfinite_steps_stop_the_run_naming_the_batches(tiny_manifests, tmp_path):
    cfg = _cfg(tiny_manifests, **{"train.max_steps": 6, "train.max_nonfinite_steps": 1})
    trainer = type("T", (_NaNAt,), {"nan_steps": frozenset({2, 3, 4, 5, 6})})(cfg, tmp_path / "run")
    with pytest.raises(UserError) as exc:
        trainer.run()
    msg = str(exc.value)
    assert "step" in msg and any(u.key in msg for u in read_manifest(tiny_manifests / "train.jsonl"))


def _manifests_with(src, tmp_path, split, audio=None, count=1, **fields):
    """A copy of the manifests ``src`` whose first ``count`` (None: every) ``split`` utterances
    point at ``audio`` (default: a file that is not audio) with ``fields`` replaced; returns the
    copy's folder, the split as written and the first changed utterance as it was."""
    man = tmp_path / "manifests"
    shutil.copytree(src, man)
    if audio is None:
        audio = tmp_path / "broken.flac"
        audio.write_bytes(b"not audio at all")
    utts = read_manifest(man / f"{split}.jsonl")
    first = utts[0]
    for i in range(len(utts) if count is None else count):
        utts[i] = dataclasses.replace(utts[i], audio=str(audio), **fields)
    write_manifest(man / f"{split}.jsonl", utts)
    return man, utts, first


def test_bad_audio_is_skipped_with_a_reason_and_a_limit(tiny_manifests, tmp_path, caplog):
    man, train, bad = _manifests_with(tiny_manifests, tmp_path, "train")
    cfg = _cfg(man, **{"train.max_steps": 2, "data.max_bad_fraction": 0.2})
    with caplog.at_level("WARNING", logger="sparse_rnnt"):
        Trainer(cfg, tmp_path / "run").run()
    # Without a progress bar the summary is a warning: the CLI shows WARNING and above.
    assert any(r.levelname == "WARNING" and f"skipped 1 training utterance(s): unreadable_audio (e.g. {bad.key})"
               in r.getMessage() for r in caplog.records)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["skipped"]["unreadable_audio"]["count"] == 1
    assert report["skipped"]["unreadable_audio"]["first"] == [bad.key]
    assert sum(report["kept"].values()) == len(train) - 1
    listed = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert listed == [{"split": "train", "reason": "unreadable_audio", "key": bad.key}]
    strict = _cfg(man, **{"train.max_steps": 2, "data.max_bad_fraction": 0.0})
    with pytest.raises(UserError, match="unreadable_audio"):
        Trainer(strict, tmp_path / "strict").run()
    assert not (tmp_path / "strict").exists()


def test_audio_too_short_for_an_encoder_frame_is_skipped(tiny_manifests, tmp_path):
    # 300 samples give 2 feature frames: no encoder frame after the stride-4 reduction. Alone in
    # a batch (max_batch 1) it used to stop training with a traceback inside the Emformer.
    import numpy as np
    import soundfile as sf

    short = tmp_path / "short.wav"
    sf.write(str(short), (0.1 * np.sin(np.arange(300) / 5)).astype(np.float32), 16000)
    man, train, bad = _manifests_with(tiny_manifests, tmp_path, "train", audio=short, duration=300 / 16000)
    cfg = _cfg(man, **{"train.max_steps": 3, "batch.max_batch": 1, "data.max_bad_fraction": 0.2})
    Trainer(cfg, tmp_path / "run").run()
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["skipped"]["too_short"] == {"count": 1, "first": [bad.key]}
    assert sum(report["kept"].values()) == len(train) - 1


@pytest.mark.parametrize("cache", [True, False])
def test_bad_dev_audio_is_left_out_of_evaluation_not_fatal(tiny_manifests, tmp_path, cache):
    # One unreadable dev file used to stop set-up (feature cache) or the final evaluation.
    man, dev, bad = _manifests_with(tiny_manifests, tmp_path, "dev")
    cfg = _cfg(man, **{"train.max_steps": 2, "data.cache_features": cache})
    result = Trainer(cfg, tmp_path / "run").run()
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["dev_skipped"] == {"unreadable_audio": {"count": 1, "first": [bad.key]}}
    listed = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert listed == [{"split": "dev", "reason": "unreadable_audio", "key": bad.key}]
    evaluated = sum(c["utterances"] for c in result["dev"]["per_language"].values())
    per_lang_cap = _cfg(man).data.dev_max_utterances
    expected = sum(min(per_lang_cap, sum(u.language == lang for u in dev)) for lang in {u.language for u in dev}) - 1
    assert evaluated == expected


def test_all_training_audio_bad_is_one_error_with_the_counts(tiny_manifests, tmp_path):
    man, train, _ = _manifests_with(tiny_manifests, tmp_path, "train", count=None)
    cfg = _cfg(man, **{"train.max_steps": 2, "data.max_bad_fraction": 1.0})
    with pytest.raises(UserError, match=rf"every training utterance was skipped \({len(train)} unreadable_audio\)"):
        Trainer(cfg, tmp_path / "run").run()
    assert not (tmp_path / "run").exists()


def test_non_finite_features_are_named_before_the_cmvn_fit():
    # The CMVN fit would only say its statistics are not finite; the trainer names the utterance.
    from sparse_rnnt.data.features import GlobalCMVN
    from sparse_rnnt.training.trainer import finite_features

    good, bad = torch.randn(7, 3), torch.randn(5, 3)
    bad[2, 1] = float("inf")
    fitted = GlobalCMVN.fit(finite_features([("en/a", good)]))
    torch.testing.assert_close(fitted.mean, good.double().mean(0).to(fitted.mean.dtype))
    with pytest.raises(UserError, match="utterance en/b: its log-mel features hold NaN or Inf"):
        GlobalCMVN.fit(finite_features([("en/a", good), ("en/b", bad)]))


class _AudioGoneAfterSetup(Trainer):
    """Deletes the audio of ``gone`` (training keys; None: all) once set-up has checked it, as
    when a network mount drops mid-run."""

    gone: frozenset[str] | None = None
    collated = 0

    def _collate(self, idx):
        self.collated += 1  # fail, rather than hang, if the run spins through empty epochs
        assert self.collated < 2000, "the run went on drawing batches of unreadable audio"
        return super()._collate(idx)

    def setup(self):
        super().setup()
        for u in self.train_utts:
            if self.gone is None or u.key in self.gone:
                Path(u.audio).unlink()


def _own_audio_copy(src, tmp_path):
    """The manifests ``src`` with every audio file copied under ``tmp_path`` (the tests delete them)."""
    man = tmp_path / "manifests"
    shutil.copytree(src, man)
    for split in ("train", "dev", "test"):
        utts = read_manifest(man / f"{split}.jsonl")
        moved = []
        for u in utts:
            dst = tmp_path / "audio" / split / u.language / Path(u.audio).name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(u.audio, dst)
            moved.append(dataclasses.replace(u, audio=str(dst)))
        write_manifest(man / f"{split}.jsonl", moved)
    return man


def test_audio_unreadable_after_the_check_is_counted_and_limited(tiny_manifests, tmp_path):
    man = _own_audio_copy(tiny_manifests, tmp_path)
    train = read_manifest(man / "train.jsonl")
    lost = train[3].key
    over = {"data.cache_features": "false", "train.max_steps": 12, "train.checkpoint_every": 4,
            "batch.max_frames": 2000}
    # Within the limit: trained on without it, counted in data_report.json, logged.
    trainer = type("T", (_AudioGoneAfterSetup,), {"gone": frozenset({lost})})(
        _cfg(man, **over, **{"data.max_bad_fraction": 0.1}), tmp_path / "ok")
    trainer.run()
    report = json.loads((tmp_path / "ok" / "data_report.json").read_text())
    assert report["unreadable_during_training"] == {"count": 1, "first": [lost]}
    assert trainer.step == 12
    # Over it (1 of 16 > 5%): the run stops at its next checkpoint naming the utterance.
    man = _own_audio_copy(tiny_manifests, tmp_path / "again")
    strict = type("T", (_AudioGoneAfterSetup,), {"gone": frozenset({lost})})(
        _cfg(man, **over, **{"data.max_bad_fraction": 0.05}), tmp_path / "strict")
    with pytest.raises(UserError, match=rf"1 of 16 training utterances .* unreadable during training 1 \(e\.g\. {lost}\)"):
        strict.run()


def test_an_epoch_without_a_batch_stops_the_run_instead_of_spinning(tiny_manifests, tmp_path):
    # Every file gone after the check: each epoch drew only unreadable items, and the sampler
    # looped forever (a busy loop, no step, no message).
    man = _own_audio_copy(tiny_manifests, tmp_path)
    cfg = _cfg(man, **{"data.cache_features": "false", "data.max_bad_fraction": 1.0})
    with pytest.raises(UserError, match=r"epoch 0 gave no training batch: the audio of every utterance it drew "
                                        r"became unreadable after the data check \(16 so far"):
        _AudioGoneAfterSetup(cfg, tmp_path / "run").run()


def test_resume_from_a_checkpoint_at_the_end_of_an_epoch(tiny_manifests, tmp_path):
    # The resumed pass over that epoch draws nothing, which is not an epoch without batches:
    # it must go on with the next epoch and end as the uninterrupted run did.
    cfg = _cfg(tiny_manifests, **{"train.max_steps": 6, "train.checkpoint_every": 3})
    whole = Trainer(cfg, tmp_path / "whole")
    whole.run()
    at3 = load_checkpoint(tmp_path / "whole" / "checkpoints" / "step-0000003")
    state = at3.meta["extra"]["sampler"]
    assert state == {**state, "epoch": 0, "consumed": 3} and whole.sampler.epoch >= 1  # the premise
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step-0000006")
    (tmp_path / "cut" / "checkpoints" / "latest").write_text("step-0000003\n")
    Trainer(cfg, tmp_path / "cut", resume=True).run()
    end, ref = load_checkpoint(tmp_path / "cut"), load_checkpoint(tmp_path / "whole")
    assert end.path.name == ref.path.name == "step-0000006"
    assert end.model.keys() == ref.model.keys()
    assert all(torch.equal(end.model[k], ref.model[k]) for k in ref.model)


def test_a_format_1_checkpoint_with_damaged_training_state_is_one_line(tiny_manifests, tmp_path):
    # Format 1 has no metadata digest, so nothing catches an edit before the resume reads it.
    cfg = _cfg(tiny_manifests, **{"train.max_steps": 2, "train.checkpoint_every": 2})
    Trainer(cfg, tmp_path / "run").run()
    meta_path = tmp_path / "run" / "checkpoints" / "step-0000002" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("meta_sha256")
    del meta["extra"]["scheduler"]
    meta_path.write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(UserError, match=r"--resume: .*step-0000002: damaged training state in checkpoint\.json "
                                        r"\(KeyError: 'scheduler'\)"):
        Trainer(cfg, tmp_path / "run", resume=True).run()


def test_a_diverged_run_resumes_past_the_bad_batches_with_a_larger_limit(tiny_manifests, tmp_path, caplog):
    # The stop message's advice must be something the CLI accepts: the fault limits may change on
    # --resume (warned), anything else (the learning rate) may not.
    cfg = _cfg(tiny_manifests, **{"train.max_steps": 4, "train.checkpoint_every": 2,
                                  "train.max_nonfinite_steps": 1})
    first = type("T", (_NaNAt,), {"nan_steps": frozenset({3, 4})})(cfg, tmp_path / "run")
    with pytest.raises(UserError, match=r"resume with a larger limit \(--resume --set train\.max_nonfinite_steps=N"):
        first.run()
    assert load_checkpoint(tmp_path / "run").step == 2
    lr = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=cfg.optim.lr / 10))
    with pytest.raises(UserError, match=r"the config differs .* in optim\.lr"):
        Trainer(lr, tmp_path / "run", resume=True).run()
    more = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_nonfinite_steps=5))
    # The same two batches come first again (the resume replays them): skipped, then the run ends.
    again = type("T", (_NaNAt,), {"nan_steps": frozenset({1, 2})})(more, tmp_path / "run", resume=True)
    with caplog.at_level("WARNING", logger="sparse_rnnt"):
        again.run()
    assert again.step == 4 and again.guard.skipped == 2
    assert "--resume: train.max_nonfinite_steps is now 5 (was 1)" in caplog.text
    assert load_checkpoint(tmp_path / "run").config["train"]["max_nonfinite_steps"] == 5


def test_resume_warns_when_the_training_set_changed(tiny_manifests, tmp_path, caplog):
    # The saved sampler position indexes into the kept items: another set shifts every batch.
    man = tmp_path / "manifests"
    shutil.copytree(tiny_manifests, man)
    cfg = _cfg(man, **{"train.max_steps": 4, "train.checkpoint_every": 2})
    Trainer(cfg, tmp_path / "run").run()
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.meta["extra"]["train_items"]["count"] == 16
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000004")
    with caplog.at_level("WARNING", logger="sparse_rnnt"):
        Trainer(cfg, tmp_path / "run", resume=True).run()
    assert "training set differs" not in caplog.text  # the same items: no warning
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000004")
    train = read_manifest(man / "train.jsonl")
    write_manifest(man / "train.jsonl", train[:3] + train[4:])
    caplog.clear()
    with caplog.at_level("WARNING", logger="sparse_rnnt"):
        Trainer(cfg, tmp_path / "run", resume=True).run()
    assert "the training set differs from the one" in caplog.text and "(16 utterances then, 15 now" in caplog.text
