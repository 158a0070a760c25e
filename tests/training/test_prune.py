"""Pruned training: every method resumes bit-exactly, reaches its sparsity, and evaluates."""

import pytest
import torch

from sparse_rnnt.cli import main
from sparse_rnnt.config import config_from_tree, to_dict
from sparse_rnnt.pruning.scope import select_parameters
from sparse_rnnt.training.checkpoint import load_checkpoint
from sparse_rnnt.training.inference import evaluate_checkpoint, load_recognizer
from sparse_rnnt.training.trainer import RUN_ENTRIES, Trainer

METHODS = ("imp", "lth", "lap", "adaptive", "dynamic-pathways", "pathways-alternate", "pathways-sum")
PER_LANGUAGE = ("dynamic-pathways", "pathways-alternate", "pathways-sum")
LEVELS = (0.2, 0.5)


def _dense_overrides(manifests) -> dict[str, object]:
    return {
        "data.manifest_dir": str(manifests), "data.workers": 1, "train.max_steps": 4, "train.log_every": 1,
        "train.eval_every": 0, "train.checkpoint_every": 2, "train.threads": 1, "train.progress": False,
        "batch.max_frames": 400, "model.transformer_num_layers": 2, "optim.warmup_steps": 2,
    }


@pytest.fixture(scope="module")
def dense_run(tiny_manifests, tmp_path_factory):
    out = tmp_path_factory.mktemp("dense") / "run"
    over = _dense_overrides(tiny_manifests)
    cfg = config_from_tree({}, [f"{k}={v}" for k, v in over.items()])
    Trainer(cfg, out).run()
    return out


def _prune_cfg(dense_dir, method, stage1=None, **extra):
    """``method`` may be ``pathways-alternate`` / ``pathways-sum`` (needs ``stage1``: {lang: run})."""
    base = load_checkpoint(dense_dir).config
    over = {
        "pruning.method": method, "pruning.levels": "[0.2,0.5]", "pruning.target_sparsity": 0.5,
        "pruning.interval": 3, "pruning.adapt_every": 1, "train.max_steps": 5, "train.checkpoint_every": 2,
    }
    if method.startswith("pathways-"):
        over["pruning.method"], over["pruning.aggregation"] = "pathways", method.split("-")[1]
        over["pruning.init_masks"] = ",".join(f"{lang}={run}" for lang, run in stage1.items())
    if method in PER_LANGUAGE:
        over["batch.mode"] = "monolingual"
    over.update(extra)
    return config_from_tree(base, [f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def stage1(dense_run, tmp_path_factory):
    """ASR Pathways stage 1: one monolingual IMP run per language, from the dense model."""
    root = tmp_path_factory.mktemp("stage1")
    runs = {}
    for lang in ("en", "fr"):
        cfg = _prune_cfg(dense_run, "imp", **{"data.languages": f"[{lang}]"})
        Trainer(cfg, root / lang, init_checkpoint=dense_run).run()
        runs[lang] = root / lang
    return runs


class _Crash(Exception):
    pass


class _CrashingTrainer(Trainer):
    def train_step(self, batch):
        if self.step == 3:  # after the step-2 checkpoint, before the 0.5 sparsity step at 3
            raise _Crash
        return super().train_step(batch)


def _masks(ckpt, method, languages):
    """Unpack the saved masks by hand (little-endian bits, per MaskSet.pack's documented format):
    {language or "": {param: bool tensor}}."""
    shapes = ckpt.meta["extra"]["pruner"]["shapes"]
    prefixes = [f"{lang}/" for lang in languages] if method in PER_LANGUAGE else [""]
    out = {}
    for prefix in prefixes:
        masks = {}
        for name, shape in shapes.items():
            packed = ckpt.state_tensors[f"extra.pruner/mask/{prefix}{name}"]
            bits = [(int(byte) >> i) & 1 for byte in packed.tolist() for i in range(8)]
            n = int(torch.tensor(shape).prod())
            masks[name] = torch.tensor(bits[:n], dtype=torch.bool).reshape(shape)
        out[prefix.rstrip("/")] = masks
    return out


# 10-11 s each, run by make test-slow: adaptive's kill-and-resume is bit-exact in test_crash, and
# pathways-alternate resumes the one sampler as dynamic-pathways does and its stage-1 masks as
# pathways-sum does (sum has per-language samplers to resume, so it stays).
_RESUME_SLOW = ("adaptive", "pathways-alternate")


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow) if m in _RESUME_SLOW else m
                                    for m in METHODS])
def test_pruning_run_resumes_exactly_and_reaches_its_level(method, dense_run, stage1, tiny_manifests, tmp_path):
    cfg = _prune_cfg(dense_run, method, stage1)
    Trainer(cfg, tmp_path / "a", init_checkpoint=dense_run).run()
    with pytest.raises(_Crash):
        _CrashingTrainer(cfg, tmp_path / "b", init_checkpoint=dense_run).run()
    assert load_checkpoint(tmp_path / "b").step == 2
    Trainer(cfg, tmp_path / "b", resume=True, init_checkpoint=dense_run).run()
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a.step == b.step == 5
    for k in a.model:
        assert torch.equal(a.model[k], b.model[k]), k
    pruner_keys = [k for k in a.state_tensors if k.startswith("extra.pruner/")]
    assert any("/mask/" in k for k in pruner_keys) and any("/theta0/" in k for k in pruner_keys)
    for k in pruner_keys:
        assert torch.equal(a.state_tensors[k], b.state_tensors[k]), k
    assert a.meta["extra"]["pruner"] == b.meta["extra"]["pruner"]

    # The pruned run shares the dense run's vocabulary and feature statistics.
    for name in ("tokenizer.model", "cmvn.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (dense_run / name).read_bytes()

    # Sparsity by hand from the saved masks: the level reached (0.5), per language for pathways.
    languages = a.meta["extra"]["languages"]
    assert languages == ["en", "fr"]
    rec = load_recognizer(tmp_path / "a")
    saved = _masks(a, method, languages)
    for key, masks in saved.items():
        ref = rec.masks if key == "" else rec.language_masks[key]
        total = sum(m.numel() for m in masks.values())
        assert all(torch.equal(m, ref[n]) for n, m in masks.items())  # the loader reads the same masks
        chosen = masks
        pruned = sum(int((~m).sum()) for m in chosen.values())
        assert abs(pruned / total - LEVELS[-1]) <= 1.0 / total + 1e-9, key
        if method in ("imp", "lth", "lap"):
            for n, m in chosen.items():
                assert torch.all(a.model[n][~m] == 0), n  # hard: pruned weights exactly zero on disk
                assert torch.count_nonzero(a.model[n][m]) > 0.9 * int(m.sum())
    if method.startswith("pathways"):
        # Stage-2 masks are the stage-1 runs' final masks, unchanged; outside their union theta is 0.
        for lang, run in stage1.items():
            first = _masks(load_checkpoint(run), "imp", [lang])[""]
            assert all(torch.equal(first[n], saved[lang][n]) for n in first), lang
        for n in saved["en"]:
            assert torch.all(a.model[n][~(saved["en"][n] | saved["fr"][n])] == 0), n
    if method == "adaptive":  # soft: pruned weights were set to zero at the last re-rank (step 5)
        params = dict(rec.model.named_parameters())
        for n, mask in saved[""].items():
            assert torch.count_nonzero(a.model[n][~mask]) == 0
            assert torch.equal(params[n].detach(), a.model[n] * mask)

    # Evaluation of the pruned checkpoint, per language.
    res, info = evaluate_checkpoint(tmp_path / "a", tiny_manifests, split="test", progress=False, device="cpu")
    assert info["step"] == 5
    assert set(res.per_language) == {"en", "fr"}
    assert sum(c.utterances for c in res.per_language.values()) == 16


def test_dynamic_pathways_decodes_each_language_with_its_own_mask(dense_run, stage1, tiny_manifests, tmp_path):
    # Started from the per-language IMP masks (as the paper starts from LTH or LAP masks).
    spec = ",".join(f"{lang}={run}" for lang, run in stage1.items())
    cfg = _prune_cfg(dense_run, "dynamic-pathways", **{"pruning.init_masks": spec, "pruning.levels": "[0.5]"})
    Trainer(cfg, tmp_path / "p", init_checkpoint=dense_run).run()
    rec = load_recognizer(tmp_path / "p")
    params = dict(rec.model.named_parameters())
    scope = select_parameters(rec.model, cfg.pruning.scope)
    dense = {n: p.detach().clone() for n, p in params.items()}
    for lang in ("en", "fr"):
        with rec.masked(lang):
            for n in scope:
                ref = dense[n] * rec.language_masks[lang][n]
                assert torch.equal(params[n].detach(), ref), (lang, n)
    for n, p in params.items():  # restored afterwards
        assert torch.equal(p.detach(), dense[n])
    assert not rec.language_masks["en"].equal(rec.language_masks["fr"])


def test_prune_cli_help_and_user_errors(dense_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--method", "--init", "--out", "--target-sparsity", "--schedule", "--levels", "--interval",
                "--adapt-every", "--variant", "--granularity", "--ranking", "--languages", "--steps", "--set",
                "--resume"):
        assert opt in text, opt
    assert main(["prune", "--method", "imp", "--init", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    # dynamic-pathways forces monolingual batches; a missing method key is a clear config error
    assert main(["prune", "--method", "dynamic-pathways", "--init", str(dense_run), "--out", str(tmp_path / "o"),
                 "--levels", "0.3", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "mode: monolingual" in printed and "method: dynamic-pathways" in printed
    assert main(["prune", "--method", "imp", "--init", str(dense_run), "--out", str(tmp_path / "o"),
                 "--granularity", "3-4"]) == 2
    assert "--granularity" in capsys.readouterr().err


def test_pruning_config_in_experiment_config():
    cfg = config_from_tree({}, ["pruning.method=imp", "pruning.levels=[0.3]", "pruning.target_sparsity=0.3"])
    assert cfg.pruning is not None and cfg.pruning.levels == (0.3,)
    assert config_from_tree(to_dict(cfg)).pruning == cfg.pruning  # YAML/JSON round trip
    assert config_from_tree({}).pruning is None
    from sparse_rnnt.errors import UserError

    with pytest.raises(UserError, match=r"pruning\.method"):
        config_from_tree({}, ["pruning.interval=5"])
    with pytest.raises(UserError, match="monolingual"):
        config_from_tree({}, ["pruning.method=dynamic-pathways"])


def test_pathways_sum_takes_one_batch_per_language_per_step(dense_run, stage1, tmp_path):
    cfg = _prune_cfg(dense_run, "pathways-sum", stage1)
    Trainer(cfg, tmp_path / "s", init_checkpoint=dense_run).run()
    extra = load_checkpoint(tmp_path / "s").meta["extra"]
    states = extra["language_samplers"]
    assert sorted(states) == ["en", "fr"]
    for lang, state in states.items():
        # Each language's own sampler advanced once per optimizer step (5 steps, across epochs).
        dense = Trainer(cfg, tmp_path / f"probe-{lang}", init_checkpoint=dense_run)
        dense.setup()
        _, sampler = dense.language_samplers[lang]
        per_epoch = len(sampler)
        assert state["epoch"] * per_epoch + state["consumed"] == 5, (lang, state, per_epoch)


def test_level_snapshots_feed_dynamic_pathways_at_any_level(dense_run, tmp_path):
    from sparse_rnnt.pruning.masks import LanguageMasks, MaskSet
    from sparse_rnnt.training.stage_masks import level_snapshot_path

    runs = {}
    for lang in ("en", "fr"):  # LTH per language, snapshots at 20% and 50%
        cfg = _prune_cfg(dense_run, "lth", **{"data.languages": f"[{lang}]"})
        Trainer(cfg, tmp_path / lang, init_checkpoint=dense_run).run()
        runs[lang] = tmp_path / lang
        for level in LEVELS:
            snap = MaskSet.load(level_snapshot_path(runs[lang], level))
            total = snap.numel()
            assert abs(snap.sparsity() - level) <= 1.0 / total + 1e-12
        final = _masks(load_checkpoint(runs[lang]), "lth", [lang])[""]
        last = MaskSet.load(level_snapshot_path(runs[lang], LEVELS[-1]))
        assert all(torch.equal(final[n], last[n]) for n in final)  # hard: fixed after the last step
        first = MaskSet.load(level_snapshot_path(runs[lang], LEVELS[0]))
        assert all(bool((last[n] <= first[n]).all()) for n in last)  # IMP/LTH masks are nested

    # Dynamic pathways from the LTH masks at 20%, stepping to 50% at step 3: until then each
    # language keeps its starting mask's budget and re-ranks only inside its selectable zone.
    spec = ",".join(f"{lang}={run}" for lang, run in runs.items())
    cfg = _prune_cfg(dense_run, "dynamic-pathways", **{
        "pruning.init_masks": spec, "pruning.init_level": 0.2, "pruning.levels": "[0.2,0.5]",
        "train.max_steps": 2, "pruning.adapt_every": 2,
    })
    t = Trainer(cfg, tmp_path / "dp", init_checkpoint=dense_run)
    t.setup()
    start = {lang: MaskSet.load(level_snapshot_path(runs[lang], 0.2)) for lang in runs}
    pruner = t.pruner
    assert pruner is not None and pruner.level == pytest.approx(0.2, abs=1e-3)
    lm = pruner.language_masks()
    # step 0 is a 0.2 level event: each language re-ranked inside its free zone + own mask
    zones = LanguageMasks(start)
    for lang in runs:
        zone = zones.selectable_zone(lang)
        assert all(bool((lm[lang][n] <= zone[n]).all()) for n in zone.names), lang
        assert abs(lm[lang].sparsity() - 0.2) <= 1.0 / lm[lang].numel() + 1e-12


def test_prune_writes_mask_analytics(dense_run, tmp_path):
    import json

    cfg = _prune_cfg(dense_run, "dynamic-pathways")
    Trainer(cfg, tmp_path / "p", init_checkpoint=dense_run).run()
    rec = load_recognizer(tmp_path / "p")
    report = json.loads((tmp_path / "p" / "analytics" / "masks.json").read_text())
    assert report["step"] == 5 and report["kind"] == "multilingual"
    en, fr = rec.language_masks["en"], rec.language_masks["fr"]
    inter = sum(int((en[n] & fr[n]).sum()) for n in en.names)
    union = sum(int((en[n] | fr[n]).sum()) for n in en.names)
    assert report["iou"]["en"]["fr"] == pytest.approx(inter / union)
    assert report["union"]["sparsity"] == pytest.approx(1 - union / en.numel())
    history = json.loads((tmp_path / "p" / "analytics" / "history.json").read_text())["history"]
    assert [h["step"] for h in history] == sorted(h["step"] for h in history)
    assert {h["event"] for h in history} == {"level", "rerank"}
    # metrics.jsonl logs every event under the step it happened at: prepare()'s step-0 level too
    # (it rode with step 1's row before).
    rows = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], e["step"]) for r in rows if "pruning" in r for e in r["pruning"]]
    assert logged and all(row_step == event_step for row_step, event_step in logged)
    assert [e for e in history if e["step"] == 0] and sorted(s for s, _ in logged) == [h["step"] for h in history]
    for name in ("overlap.png", "sparsity_churn.png"):
        data = (tmp_path / "p" / "analytics" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
    # a fresh run refuses folders holding anything else, so this list must name all it writes
    assert {p.name for p in (tmp_path / "p").iterdir()} <= RUN_ENTRIES


def test_init_masks_user_errors(dense_run, stage1, tmp_path):
    from sparse_rnnt.errors import UserError

    bad = {
        "en=" + str(stage1["en"]): "exactly one source per language",  # fr missing
        str(dense_run): "dense checkpoint",
        str(tmp_path / "nowhere"): "does not exist",
        f"en={stage1['en']},en={stage1['fr']}": "given twice",
    }
    for spec, msg in bad.items():
        cfg = _prune_cfg(dense_run, "dynamic-pathways", **{"pruning.init_masks": spec, "pruning.levels": "[0.5]"})
        with pytest.raises(UserError, match=msg):
            Trainer(cfg, tmp_path / "x", init_checkpoint=dense_run).run()
        assert not (tmp_path / "x").exists()
    cfg = _prune_cfg(dense_run, "dynamic-pathways", **{"pruning.init_masks": str(stage1["en"]), "pruning.init_level": 0.3})
    with pytest.raises(UserError, match=r"levels saved: 0\.200, 0\.500"):
        Trainer(cfg, tmp_path / "x", init_checkpoint=dense_run).run()
    with pytest.raises(UserError, match="init_masks"):
        config_from_tree(load_checkpoint(dense_run).config, ["pruning.method=pathways", "batch.mode=monolingual"])


@pytest.mark.slow  # the Triton interpreter runs every kernel program in Python: ~1 min per run
def test_training_with_triton_backend_matches_torch(dense_run, tmp_path):
    # The CPU counterpart at small sizes for every method: tests/pruning/test_backend.py.
    import json

    curves, finals = {}, {}
    for backend in ("torch", "triton"):
        # optim.eps 1e-4: Adam turns float noise in near-zero gradients into full steps of either
        # sign (soft-pruned weights regrow from exactly zero), which would make the two backends'
        # re-ranks differ near the threshold for reasons unrelated to the kernels.
        cfg = _prune_cfg(dense_run, "adaptive", **{"pruning.backend": backend, "train.max_steps": 4,
                                                   "data.dev_max_utterances": 1, "optim.eps": 1e-4})
        Trainer(cfg, tmp_path / backend, init_checkpoint=dense_run).run()
        rows = [json.loads(line) for line in (tmp_path / backend / "metrics.jsonl").read_text().splitlines()]
        curves[backend] = torch.tensor([r["loss"] for r in rows if "loss" in r])
        finals[backend] = load_checkpoint(tmp_path / backend)
    assert len(curves["torch"]) == 4
    torch.testing.assert_close(curves["triton"], curves["torch"], rtol=1e-3, atol=1e-4)
    a, b = finals["torch"], finals["triton"]
    masks = [k for k in a.state_tensors if "/mask/" in k]
    assert masks and all(torch.equal(a.state_tensors[k], b.state_tensors[k]) for k in masks)
    assert a.meta["extra"]["pruner"]["history"] == b.meta["extra"]["pruner"]["history"]



def test_dynamic_pathways_languages_take_turns_with_round_robin_order(dense_run, tmp_path):
    seen: list[str | None] = []

    class Recording(Trainer):
        def train_step(self, batch):
            seen.append(self._batch_language(batch))
            return super().train_step(batch)

    cfg = _prune_cfg(dense_run, "dynamic-pathways", **{"batch.order": "round-robin", "train.max_steps": 6})
    Recording(cfg, tmp_path / "p", init_checkpoint=dense_run).run()
    assert seen == ["en", "fr"] * 3  # one batch each, in sorted order


def test_schedule_that_outlasts_the_run_is_refused_before_any_work(dense_run, tmp_path, capsys):
    from sparse_rnnt.errors import UserError

    # 3 steps, T = 2, default levels 0.2/0.5/0.7: the 0.7 step would be at step 4. The run used to
    # end at 0.5 with exit 0.
    out = tmp_path / "o"
    args = ["prune", "--method", "imp", "--init", str(dense_run), "--out", str(out), "--steps", "3", "--interval", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "at step 4" in err and "--steps 3" in err and "--interval (2)" in err and "--levels (0.2,0.5,0.7)" in err
    assert not out.exists()
    # The same from code (the trainer checks before reading any data).
    with pytest.raises(UserError, match=r"last sparsity step \(to 0\.5\) at step 3, after the run's last step .* 2"):
        Trainer(_prune_cfg(dense_run, "lth", **{"train.max_steps": 2}), out, init_checkpoint=dense_run).run()
    assert not out.exists()


def test_schedule_ending_on_the_final_step_warns_once(dense_run, tmp_path, caplog):
    import logging

    # levels 0.2 (step 0) -> 0.5 at step 3 = the final step: reached, never fine-tuned.
    cfg = _prune_cfg(dense_run, "lth", **{"train.max_steps": 3, "data.languages": "[en]"})
    with caplog.at_level(logging.WARNING, logger="sparse_rnnt.training.trainer"):
        Trainer(cfg, tmp_path / "p", init_checkpoint=dense_run).run()
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "never trained at the target" in r.message]
    assert len(warned) == 1 and "final step 3" in warned[0].message
    assert load_checkpoint(tmp_path / "p").meta["extra"]["pruner"]["history"][-1]["step"] == 3


def test_nm_granularity_with_other_levels_is_refused_up_front(dense_run, tmp_path, capsys):
    base = ["prune", "--method", "imp", "--init", str(dense_run), "--out", str(tmp_path / "o"), "--granularity", "2:4"]
    for extra in (["--print-config"], ["--levels", "0.5,0.7", "--steps", "4", "--interval", "2"]):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert "2:4 prunes exactly 0.5" in err and "--levels 0.5" in err and "--schedule oneshot" in err
        assert not (tmp_path / "o").exists()
    assert main([*base, "--levels", "0.5", "--print-config"]) == 0
    assert "target_sparsity: 0.5" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["imp", "lth", "lap"])
def test_init_masks_sparser_than_the_first_level_are_refused_before_the_data_work(
        method, dense_run, tmp_path, monkeypatch):
    from sparse_rnnt.errors import UserError
    from sparse_rnnt.pruning.masks import MaskSet
    from sparse_rnnt.pruning.scope import ScopeConfig
    from sparse_rnnt.training import trainer

    params = select_parameters(load_recognizer(dense_run).model, ScopeConfig())
    g = torch.Generator().manual_seed(0)
    MaskSet({n: torch.rand(p.shape, generator=g) < 0.5 for n, p in params.items()}).save(tmp_path / "m.safetensors")

    def no_data_work(*args, **kwargs):
        raise AssertionError("the data were screened before the init masks were checked")

    monkeypatch.setattr(trainer, "screen", no_data_work)
    cfg = _prune_cfg(dense_run, method, **{"pruning.init_masks": str(tmp_path / "m.safetensors")})
    with pytest.raises(UserError, match=r"the init masks are at sparsity 0\.5\d\d, above the first level 0\.2: "
                                        r"pass --levels starting at 0\.5\d* or above"):
        Trainer(cfg, tmp_path / "o", init_checkpoint=dense_run).run()
    assert not (tmp_path / "o").exists()


def test_rerun_in_place_takes_the_dense_runs_tokenizer(dense_run, tmp_path):
    # A pruning run stopped before its first checkpoint, started again from another dense run:
    # its tokenizer.model is replaced by the one the run trains with (it used to be refused).
    out = tmp_path / "p"
    out.mkdir()
    from sparse_rnnt.data.tokenizer import Tokenizer, TokenizerConfig

    stale = Tokenizer.train(["zzz qqq"], TokenizerConfig(), out / "tokenizer.model")
    assert stale.to_bytes() != (dense_run / "tokenizer.model").read_bytes()
    t = Trainer(_prune_cfg(dense_run, "imp"), out, init_checkpoint=dense_run)
    t.setup()
    assert (out / "tokenizer.model").read_bytes() == (dense_run / "tokenizer.model").read_bytes()
