import json
import shutil

import pytest
import torch

from sparse_rnnt.config import load_config
from sparse_rnnt.errors import UserError
from sparse_rnnt.training.checkpoint import load_checkpoint
from sparse_rnnt.training.inference import evaluate_checkpoint
from sparse_rnnt.training.trainer import RUN_ENTRIES, Trainer, lr_lambda


def _cfg(manifests, **over):
    items = {
        "data.manifest_dir": str(manifests),
        "data.workers": 1,
        "train.max_steps": 6,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.checkpoint_every": 3,
        "train.threads": 1,
        "train.progress": False,
        "batch.max_frames": 400,
        "model.transformer_num_layers": 2,
        "model.ctc_weight": 0.3,
        "optim.warmup_steps": 2,
    }
    items.update(over)
    return load_config(None, [f"{k}={v}" for k, v in items.items()])


def test_short_run_writes_a_complete_run_directory(tiny_manifests, tmp_path):
    result = Trainer(_cfg(tiny_manifests), tmp_path / "run").run()
    run = tmp_path / "run"
    for name in ("config.yaml", "tokenizer.model", "cmvn.safetensors", "metrics.jsonl", "data_report.json"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)
    # Each row's lr is the one its update used (by hand: linear warmup over optim.warmup_steps,
    # step s uses (s) / warmup of the peak), not the scheduler's next one.
    cfg = _cfg(tiny_manifests)
    warm, peak = cfg.optim.warmup_steps, cfg.optim.lr
    assert warm >= 2
    assert [r["lr"] for r in train_rows[:2]] == pytest.approx([peak / warm, 2 * peak / warm])
    # The final step evaluates on dev and the checkpoint is usable on its own.
    assert "dev" in result and set(result["dev"]["per_language"]) == {"en", "fr"}
    res, info = evaluate_checkpoint(run, tiny_manifests, split="test", progress=False, device="cpu")
    assert info["step"] == 6
    assert sum(c.utterances for c in res.per_language.values()) == 16


class _Crash(Exception):
    pass


class _CrashingTrainer(Trainer):
    def train_step(self, batch):
        if self.step == 4:
            raise _Crash
        return super().train_step(batch)


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tiny_manifests, tmp_path):
    cfg = _cfg(tiny_manifests)
    Trainer(cfg, tmp_path / "a").run()
    with pytest.raises(_Crash):
        _CrashingTrainer(cfg, tmp_path / "b").run()
    assert load_checkpoint(tmp_path / "b").step == 3
    Trainer(cfg, tmp_path / "b", resume=True).run()
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a.step == b.step == 6
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    for k in a.state_tensors:
        if k.startswith("optim."):
            assert torch.equal(a.state_tensors[k], b.state_tensors[k]), k
    assert a.meta["extra"]["sampler"] == b.meta["extra"]["sampler"]


def test_resume_rewinds_metrics_and_restores_the_checkpoints_tokenizer_and_cmvn(tiny_manifests, tmp_path):
    cfg = _cfg(tiny_manifests)
    Trainer(cfg, tmp_path / "a").run()
    with pytest.raises(_Crash):
        _CrashingTrainer(cfg, tmp_path / "b").run()  # logged steps 1..4, checkpoint at 3
    run = tmp_path / "b"
    tok, cmvn = (run / "tokenizer.model").read_bytes(), (run / "cmvn.safetensors").read_bytes()
    (run / "tokenizer.model").write_bytes(b"damaged")  # the checkpoint's hashed copies win
    (run / "cmvn.safetensors").unlink()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 1.0')  # a line the crash cut
    Trainer(cfg, run, resume=True).run()
    assert (run / "tokenizer.model").read_bytes() == tok and (run / "cmvn.safetensors").read_bytes() == cmvn

    def rows(d):
        return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]

    ref, got = rows(tmp_path / "a"), rows(run)
    assert [r["step"] for r in got if "loss" in r] == [1, 2, 3, 4, 5, 6]
    for a, b in zip((r for r in ref if "loss" in r), (r for r in got if "loss" in r), strict=True):
        assert a["loss"] == b["loss"], a["step"]  # bit-exact resume: the same losses
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(run)
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k


def test_resume_with_a_damaged_saved_config_is_one_clear_error(tiny_manifests, tmp_path):
    cfg = _cfg(tiny_manifests, **{"train.max_steps": 3})
    Trainer(cfg, tmp_path / "run").run()
    (tmp_path / "run" / "config.yaml").write_text("train: {max_steps: [3\n")
    with pytest.raises(UserError, match=r"config\.yaml: invalid YAML"):
        Trainer(cfg, tmp_path / "run", resume=True)
    (tmp_path / "run" / "config.yaml").write_text("- just\n- a list\n")
    with pytest.raises(UserError, match=r"config\.yaml: expected a mapping"):
        Trainer(cfg, tmp_path / "run", resume=True)


def test_loss_goes_down(tiny_manifests, tmp_path):
    cfg = _cfg(tiny_manifests, **{"train.max_steps": 40, "train.checkpoint_every": 0, "optim.lr": 3e-3,
                                   "spec_augment.enabled": False})
    Trainer(cfg, tmp_path / "run").run()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["rnnt"] for r in rows if "rnnt" in r]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5


def test_run_directory_is_protected(tiny_manifests, tmp_path):
    cfg = _cfg(tiny_manifests, **{"train.max_steps": 3})
    Trainer(cfg, tmp_path / "run").run()
    with pytest.raises(UserError, match="--resume"):
        Trainer(cfg, tmp_path / "run")
    with pytest.raises(UserError, match=r"config differs .* in train\.max_steps \(saved 3, given 9\);"):
        Trainer(_cfg(tiny_manifests, **{"train.max_steps": 9}), tmp_path / "run", resume=True)
    with pytest.raises(UserError, match="no checkpoint"):
        Trainer(cfg, tmp_path / "empty", resume=True)


@pytest.mark.parametrize("tf32", [False, True])
def test_train_tf32_holds_for_the_run_only(tiny_manifests, tmp_path, tf32):
    seen = []

    class Recording(Trainer):
        def train_step(self, batch):
            seen.append(torch.backends.cuda.matmul.allow_tf32)
            return super().train_step(batch)

    before = torch.backends.cuda.matmul.allow_tf32
    Recording(_cfg(tiny_manifests, **{"train.max_steps": 1, "train.tf32": tf32}), tmp_path / "run").run()
    assert seen == [tf32]
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_fresh_run_refuses_a_folder_of_other_files(tiny_manifests, tmp_path):
    cfg = _cfg(tiny_manifests, **{"train.max_steps": 2, "train.checkpoint_every": 2})
    run = tmp_path / "run"
    Trainer(cfg, run).run()
    assert {p.name for p in run.iterdir()} <= RUN_ENTRIES
    # A run stopped before its first checkpoint (with an interrupted atomic write) re-runs in place.
    shutil.rmtree(run / "checkpoints")
    (run / ".metrics.jsonl.x1.tmp").write_text("")
    Trainer(cfg, run).run()
    assert load_checkpoint(run).step == 2
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    (home / "thesis.tex").write_text("x")
    with pytest.raises(UserError, match=r"not a training run's \(data, thesis\.tex\)"):
        Trainer(cfg, home)
    assert sorted(p.name for p in home.iterdir()) == ["data", "thesis.tex"]
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="exists and is not a directory"):
        Trainer(cfg, tmp_path / "file")


def test_unknown_language_and_empty_manifest(tiny_manifests, tmp_path):
    with pytest.raises(UserError, match="not in"):
        Trainer(_cfg(tiny_manifests, **{"data.languages": "it"}), tmp_path / "x").run()
    assert not (tmp_path / "x").exists()  # nothing half-written
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.jsonl").write_text("")
    with pytest.raises(UserError, match="no training utterances"):
        Trainer(_cfg(empty), tmp_path / "y").run()


def test_warmup_then_cosine_schedule():
    cfg = load_config(None, ["optim.warmup_steps=10", "train.max_steps=110", "optim.min_lr_ratio=0.1"])
    assert lr_lambda(0, cfg) == pytest.approx(0.1)
    assert lr_lambda(9, cfg) == pytest.approx(1.0)
    assert lr_lambda(10, cfg) == pytest.approx(1.0)
    assert lr_lambda(60, cfg) == pytest.approx(0.55)  # half-way: min + (1 - min) / 2
    assert lr_lambda(110, cfg) == pytest.approx(0.1)


def test_bf16_autocast_step_runs_on_cpu(tiny_manifests, tmp_path):
    """CPU counterpart of the CUDA bf16 path: the same autocast code, on CPU."""
    cfg = _cfg(tiny_manifests, **{"train.amp": "bf16", "train.max_steps": 2, "train.checkpoint_every": 0})
    Trainer(cfg, tmp_path / "run").run()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)


def _replace(cfg, key, value):
    """``cfg`` with the dotted ``key`` set, bypassing load_config's validation (a config built in code)."""
    import dataclasses

    section, name = key.split(".")
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})


BAD_TRAIN_VALUES = [
    ("optim.lr", float("nan")), ("optim.lr", float("inf")), ("optim.betas", (0.9, 2.0)),
    ("optim.eps", float("nan")), ("optim.eps", -1.0), ("optim.weight_decay", -1.0),
    ("optim.weight_decay", float("nan")), ("train.seed", -1), ("train.threads", -1),
    ("features.hop_ms", float("inf")), ("model.ctc_weight", float("nan")), ("batch.seed", -1),
]


@pytest.mark.parametrize(("key", "value"), BAD_TRAIN_VALUES)
def test_bad_config_value_fails_before_the_run_directory_is_created(tiny_manifests, tmp_path, key, value):
    cfg = _replace(_cfg(tiny_manifests), key, value)
    threads = torch.get_num_threads()
    run = tmp_path / "run"
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        Trainer(cfg, run).run()
    assert not run.exists()  # no config.yaml, tokenizer, CMVN stats or data report left behind
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(("key", "value"), [("optim.lr", "nan"), ("optim.lr", "inf"), ("optim.betas", "[0.9,2]"),
                                            ("optim.eps", "nan"), ("optim.weight_decay", "-1"),
                                            ("train.seed", "-1"), ("train.threads", "-1")])
def test_train_command_with_a_bad_value_is_one_line_and_leaves_nothing(tiny_manifests, tmp_path, capsys, key, value):
    from sparse_rnnt.cli import main

    run = tmp_path / "run"
    sets = [f"data.manifest_dir={tiny_manifests}", "data.workers=1", "train.max_steps=2", "train.threads=1",
            "train.progress=false", "batch.max_frames=400", "model.transformer_num_layers=2", f"{key}={value}"]
    assert main(["train", "--out", str(run), *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and key in err and "Traceback" not in err
    assert not run.exists()



def test_missing_relative_manifest_dir_says_where_it_was_looked_for(tiny_manifests, tmp_path):
    # A run's saved config keeps a relative data.manifest_dir as given; from another working
    # directory it is not found, and the error says so before anything is written.
    cfg = _cfg(tiny_manifests, **{"data.manifest_dir": "no-such-manifests"})
    with pytest.raises(UserError, match=r"manifest not found: no-such-manifests/train\.jsonl.*relative to the "
                       r"working directory.*--set data\.manifest_dir=DIR"):
        Trainer(cfg, tmp_path / "run").run()
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="manifest not found") as e:
        Trainer(_cfg(tiny_manifests, **{"data.manifest_dir": str(tmp_path / "abs")}), tmp_path / "run2").run()
    assert "working directory" not in str(e.value)
    assert not (tmp_path / "run2").exists()


def test_resume_compares_with_the_checkpoints_own_config_not_config_yaml(tiny_manifests, tmp_path, capsys):
    from sparse_rnnt.cli import main

    cfg = _cfg(tiny_manifests, **{"train.max_steps": 3})
    run = tmp_path / "run"
    Trainer(cfg, run).run()
    saved = (run / "config.yaml").read_text()
    # An edited config.yaml: a model size (was a raw load_state_dict traceback) and the optimizer
    # and length (were resumed silently with the checkpoint's weights under the new values).
    (run / "config.yaml").write_text(saved.replace("transformer_num_layers: 2", "transformer_num_layers: 3"))
    with pytest.raises(UserError, match=r"--resume: the config differs from the one .*step-0000003 was saved "
                                        r"with in model\.transformer_num_layers \(saved 2, given 3\);"):
        Trainer(load_config(run / "config.yaml"), run, resume=True)
    (run / "config.yaml").write_text(saved.replace("max_steps: 3", "max_steps: 5").replace("lr: 0.0015", "lr: 0.5"))
    assert main(["train", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "optim.lr (saved 0.0015, given 0.5)" in err and "train.max_steps (saved 3, given 5)" in err
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")] == ["step-0000003"]
    # The checkpoint's own config resumes (here via --config), and config.yaml is put back in line.
    (tmp_path / "orig.yaml").write_text(saved)
    assert main(["train", "--config", str(tmp_path / "orig.yaml"), "--out", str(run), "--resume"]) == 0
    assert load_config(run / "config.yaml") == cfg


def test_resume_with_weights_that_do_not_fit_is_one_clear_error(tiny_manifests, tmp_path):
    cfg = _cfg(tiny_manifests, **{"train.max_steps": 3})
    Trainer(cfg, tmp_path / "run").run()
    t = Trainer(cfg, tmp_path / "run", resume=True)
    assert t._resume_ckpt is not None
    del t._resume_ckpt.model[sorted(t._resume_ckpt.model)[0]]  # a checkpoint of another model
    with pytest.raises(UserError, match=r"--resume: .*step-0000003: its weights or optimizer state do not fit "
                                        r"the model of this config \(Error"):
        t.setup()


def _tokenizer_for(texts, path):
    from sparse_rnnt.data.tokenizer import Tokenizer, TokenizerConfig

    return Tokenizer.train(texts, TokenizerConfig(), path)


def test_rerun_in_place_writes_the_tokenizer_it_trains_with(tiny_manifests, tmp_path):
    from sparse_rnnt.data.manifest import load_split

    texts = [u.text for u in load_split(tiny_manifests, "train")]
    good = _tokenizer_for(texts, tmp_path / "good.model")
    stale = _tokenizer_for(["zzz qqq"], tmp_path / "stale.model")
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokenizer.model").write_bytes(stale.to_bytes())  # left by an earlier attempt that crashed
    cfg = _cfg(tiny_manifests, **{"train.max_steps": 1, "data.tokenizer": str(tmp_path / "good.model")})
    Trainer(cfg, run).run()
    assert (run / "tokenizer.model").read_bytes() == good.to_bytes()
    ckpt = load_checkpoint(run)
    assert (ckpt.path / "tokenizer.model").read_bytes() == good.to_bytes()  # the checkpoint decodes right


def test_setup_failure_in_an_existing_folder_removes_only_what_it_wrote(tiny_manifests, tmp_path):
    _tokenizer_for(["zzz qqq"], tmp_path / "useless.model")  # encodes no transcript: all are skipped
    cfg = _cfg(tiny_manifests, **{"train.max_steps": 1, "data.tokenizer": str(tmp_path / "useless.model")})
    run = tmp_path / "run"
    run.mkdir()  # made by the user, empty
    with pytest.raises(UserError, match=r"training utterances .* are unusable"):
        Trainer(cfg, run).run()
    assert run.is_dir() and list(run.iterdir()) == []
    # A run stopped before its first checkpoint: what was there stays, what this attempt added goes.
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserError, match=r"training utterances .* are unusable"):
        Trainer(cfg, run).run()
    assert [p.name for p in run.iterdir()] == ["metrics.jsonl"]
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


class _CrashBeforeCheckpoint(Trainer):
    def train_step(self, batch):
        if self.step == 4:
            raise KeyboardInterrupt  # Ctrl-C before the first checkpoint
        return super().train_step(batch)


def test_rerun_in_place_without_resume_starts_a_new_metrics_file(tiny_manifests, tmp_path):
    # A run interrupted before its first checkpoint may be re-run in place; its metrics.jsonl used
    # to be appended to, so the file read 1..4 then 1..3.
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        _CrashBeforeCheckpoint(_cfg(tiny_manifests, **{"train.checkpoint_every": 0, "train.max_steps": 10}), run).run()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    Trainer(_cfg(tiny_manifests, **{"train.max_steps": 3}), run).run()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in rows] == [1, 2, 3, 3]  # and the final dev row


def test_resume_may_change_progress_and_log_every(tiny_manifests, tmp_path, caplog):
    # Neither changes a computation: --resume refused them as a config change.
    import logging
    from pathlib import Path

    run = tmp_path / "run"
    Trainer(_cfg(tiny_manifests, **{"train.max_steps": 3}), run).run()
    cfg = _cfg(tiny_manifests, **{"train.max_steps": 3, "train.progress": True, "train.log_every": 2})
    with caplog.at_level(logging.WARNING, logger="sparse_rnnt.training.trainer"):
        Trainer(cfg, run, resume=True)
    warned = " ".join(r.message for r in caplog.records)
    assert "train.progress is now True" in warned and "train.log_every is now 2" in warned
    with pytest.raises(UserError, match=r"train\.max_steps"):  # the others are still refused
        Trainer(_cfg(tiny_manifests, **{"train.max_steps": 4, "train.progress": True}), run, resume=True)
    # A run saved on a machine with more cores resumes here on fewer threads and workers.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sparse_rnnt.training.trainer"):
        Trainer(_cfg(tiny_manifests, **{"train.max_steps": 3, "train.threads": 2, "data.workers": 0}), run,
                resume=True)
    warned = " ".join(r.message for r in caplog.records)
    assert "train.threads is now 2 (was 1)" in warned and "data.workers is now 0 (was 1)" in warned
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert "`train.progress` and `train.log_every`" in readme
    assert "`train.threads` and `data.workers` (a different CPU" in readme
