"""Data-parallel training (2 CPU processes, gloo) equals a single process on the same global batches.

One ``torch.multiprocessing.spawn`` runs every 2-rank job (the process group is created once and
reused by each Trainer, as under an outer launcher); the references run in the test process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparse_rnnt.config import config_from_tree, to_dict
from sparse_rnnt.data.manifest import load_split
from sparse_rnnt.data.sampler import BucketBatchSampler
from sparse_rnnt.errors import UserError
from sparse_rnnt.training.checkpoint import list_checkpoints, load_checkpoint
from sparse_rnnt.training.distributed import read_env, split_batch
from sparse_rnnt.training.trainer import Trainer
from tests.training.run_fixture import nan_loss

WORLD = 2
STEPS = 5
LR = 1.5e-3
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _dense_cfg(manifests: Path):
    over = {
        "data.manifest_dir": str(manifests), "data.workers": 1, "train.max_steps": 2, "train.log_every": 1,
        "train.eval_every": 0, "train.checkpoint_every": 2, "train.threads": 1, "train.progress": False,
        "batch.max_frames": 400, "model.transformer_num_layers": 2, "optim.warmup_steps": 2,
    }
    return config_from_tree({}, [f"{k}={v}" for k, v in over.items()])


def _prune_cfg(dense: Path, method: str, **extra: object):
    """5 steps, levels 0.2 (step 0) -> 0.5 (step 3), re-rank every step, no dropout (a rank's
    dropout draws cannot match a single process's), dev decoding of one utterance per language."""
    over: dict[str, object] = {
        "pruning.method": method, "pruning.levels": "[0.2,0.5]", "pruning.target_sparsity": 0.5,
        "pruning.interval": 3, "pruning.adapt_every": 1, "train.max_steps": STEPS, "train.checkpoint_every": 2,
        "model.transformer_dropout": 0.0, "model.lstm_dropout": 0.0, "optim.lr": LR,
        "data.dev_max_utterances": 1, "batch.mode": "monolingual",
    }
    if method.startswith("pathways-"):
        over["pruning.method"], over["pruning.aggregation"] = "pathways", method.split("-")[1]
    over.update(extra)
    return config_from_tree(load_checkpoint(dense).config, [f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module", autouse=True)
def _single_process_env():
    """The references run in this process: no launcher variables (the spawned ranks set theirs)."""
    with pytest.MonkeyPatch.context() as patch:
        for var in DIST_VARS:
            patch.delenv(var, raising=False)
        yield


@pytest.fixture(scope="module")
def dense(tiny_manifests, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dense") / "run"
    Trainer(_dense_cfg(tiny_manifests), out).run()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _CorruptingTrainer(Trainer):
    """Rank 1 flips one mask bit right after the step-2 mask update."""

    def train_step(self, batch):
        stats = super().train_step(batch)
        if self.dist is not None and self.dist.rank == 1 and self.step == 2:
            assert self.pruner is not None
            masks = self.pruner.masks()
            flat = masks[masks.names[0]].view(-1)
            flat[0] = ~flat[0]
        return stats


class _LosingAudioTrainer(Trainer):
    """After set-up the audio of ``lost`` (training keys) is gone: with the feature cache off it is
    read per batch, so it fails when its batch is built, on whichever rank gets it."""

    lost: tuple[str, ...] = ()

    def setup(self):
        super().setup()
        for i, u in enumerate(self.dataset.utterances):
            if u.key in self.lost:
                self.dataset.utterances[i] = dataclasses.replace(u, audio=u.audio + ".gone")


class _NaNFirstTrainer(Trainer):
    """The first forward pass gives a NaN loss (before its backward pass)."""

    calls = 0

    def _forward_backward(self, shard, language):
        self.calls += 1
        if self.calls != 1:
            return super()._forward_backward(shard, language)
        with nan_loss(self.model):
            return super()._forward_backward(shard, language)


def _trainer_class(job: dict[str, Any]) -> type[Trainer]:
    if job.get("corrupt"):
        return _CorruptingTrainer
    if job.get("lost"):
        return type("T", (_LosingAudioTrainer,), {"lost": tuple(job["lost"])})
    if job.get("nan_first"):
        return _NaNFirstTrainer
    return Trainer


def _worker(rank: int, port: int, jobs: list[dict[str, Any]], report_dir: str) -> None:
    """One rank: every job's Trainer.run() in the shared process group; outcomes as JSON."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    outcomes: dict[str, Any] = {}
    try:
        for job in jobs:
            cls = _trainer_class(job)
            if job.get("main_screens_only") and rank != 0:
                import sparse_rnnt.training.trainer as trainer_module

                def no_screen(*args: Any, **kwargs: Any) -> Any:
                    raise AssertionError("only rank 0 reads the audio to screen it")

                trainer_module.screen = no_screen  # this spawned rank's process only
            trainer = cls(config_from_tree(job["config"]), job["out"], init_checkpoint=job["init"])
            try:
                result = trainer.run()
                outcomes[job["name"]] = {"ok": True, "steps": result["steps"], "is_main": trainer.is_main}
            except Exception as e:
                outcomes[job["name"]] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                         "trace": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
        Path(report_dir, f"rank{rank}.json").write_text(json.dumps(outcomes))


def _run_ddp(jobs: list[dict[str, Any]], report_dir: Path) -> list[dict[str, Any]]:
    mp.spawn(_worker, args=(_free_port(), jobs, str(report_dir)), nprocs=WORLD, join=True)
    return [json.loads((report_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _metrics(run: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def _bad_manifests(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose first train and first dev utterance point at a broken file."""
    import dataclasses
    import shutil

    from sparse_rnnt.data.manifest import read_manifest, write_manifest

    shutil.copytree(src, dst)
    broken = dst / "broken.flac"
    broken.write_bytes(b"not audio")
    for split in ("train", "dev"):
        utts = read_manifest(dst / f"{split}.jsonl")
        utts[0] = dataclasses.replace(utts[0], audio=str(broken))
        write_manifest(dst / f"{split}.jsonl", utts)
    return dst


@pytest.fixture(scope="module")
def runs(dense, tiny_manifests, tmp_path_factory):
    """Single-process references and 2-rank runs of adaptive, dynamic-pathways and pathways-sum
    (stage-1 masks: one IMP run per language), plus a 2-rank adaptive run with a corrupted mask."""
    root = tmp_path_factory.mktemp("ddp")
    stage1 = {}
    for lang in ("en", "fr"):
        stage1[lang] = root / f"stage1-{lang}"
        Trainer(_prune_cfg(dense, "imp", **{"data.languages": f"[{lang}]"}), stage1[lang], init_checkpoint=dense).run()
    spec = ",".join(f"{lang}={run}" for lang, run in stage1.items())
    cfgs = {
        "adaptive": _prune_cfg(dense, "adaptive"),
        "dynamic-pathways": _prune_cfg(dense, "dynamic-pathways"),
        "pathways-sum": _prune_cfg(dense, "pathways-sum", **{"pruning.init_masks": spec}),
    }
    for name, cfg in cfgs.items():
        Trainer(cfg, root / f"single-{name}", init_checkpoint=dense).run()
    jobs = [{"name": name, "config": to_dict(cfg), "out": str(root / f"ddp-{name}"), "init": str(dense)}
            for name, cfg in cfgs.items()]
    jobs.append({"name": "corrupt", "config": to_dict(cfgs["adaptive"]), "out": str(root / "ddp-corrupt"),
                 "init": str(dense), "corrupt": True})
    # Bad train and dev audio: rank 0 screens, rank 1 takes its result (and may not read files).
    bad = _bad_manifests(tiny_manifests, root / "bad-manifests")
    cfgs["bad-data"] = config_from_tree(to_dict(_dense_cfg(bad)), [
        "data.max_bad_fraction=0.2", "model.transformer_dropout=0.0", "model.lstm_dropout=0.0"])
    Trainer(cfgs["bad-data"], root / "single-bad-data").run()
    jobs.append({"name": "bad-data", "config": to_dict(cfgs["bad-data"]), "out": str(root / "ddp-bad-data"),
                 "init": None, "main_screens_only": True})
    # Audio lost after the data check: the only item of a one-item batch (the batch is skipped)
    # and one item of a larger batch (the others' weights change).
    cfgs["lost"] = config_from_tree(to_dict(_dense_cfg(tiny_manifests)), [
        "data.cache_features=false", "train.max_steps=4", "model.transformer_dropout=0.0", "model.lstm_dropout=0.0",
        "batch.mode=monolingual", "data.max_bad_fraction=0.5"])  # batches of 7, 7, 1, 1
    train = load_split(tiny_manifests, "train")
    batches = BucketBatchSampler([u.duration for u in train], [u.language for u in train], cfgs["lost"].batch,
                                 frames_per_second=cfgs["lost"].features.frames_per_second).epoch_batches(0)
    single_item = next(b for b in batches if len(b) == 1)
    larger = next(b for b in batches if len(b) >= 3)
    lost = [train[single_item[0]].key, train[larger[0]].key]
    _trainer_class({"lost": lost})(cfgs["lost"], root / "single-lost").run()
    jobs.append({"name": "lost", "config": to_dict(cfgs["lost"]), "out": str(root / "ddp-lost"), "init": None,
                 "lost": lost})
    # A non-finite loss with no tolerance: the run stops naming the whole global batch.
    cfgs["nan"] = config_from_tree(to_dict(_dense_cfg(tiny_manifests)), ["train.max_nonfinite_steps=0"])
    try:
        _NaNFirstTrainer(cfgs["nan"], root / "single-nan").run()
    except UserError as e:
        single_nan = str(e)
    jobs.append({"name": "nan", "config": to_dict(cfgs["nan"]), "out": str(root / "ddp-nan"), "init": None,
                 "nan_first": True})
    outcomes = _run_ddp(jobs, root)
    cfgs["_single_nan"] = single_nan
    return root, cfgs, outcomes


def test_split_batch_partitions_in_rank_order() -> None:
    for n in range(0, 12):
        for world in range(1, 5):
            idx = list(range(100, 100 + n))
            parts = [split_batch(idx, r, world) for r in range(world)]
            assert [i for p in parts for i in p] == idx  # the union, in order: the single-process batch
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_read_env() -> None:
    assert read_env({}) is None
    assert read_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None
    env = read_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert env is not None and (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    with pytest.raises(UserError, match="RANK=4 outside WORLD_SIZE=4"):
        read_env({"WORLD_SIZE": "4", "RANK": "4", "LOCAL_RANK": "0"})
    with pytest.raises(UserError, match="LOCAL_RANK"):
        read_env({"WORLD_SIZE": "2", "RANK": "0"})


@pytest.mark.parametrize("method", ["adaptive", "dynamic-pathways", "pathways-sum"])
def test_two_ranks_match_one_process_on_the_same_global_batches(runs, dense, method):
    root, cfgs, outcomes = runs
    for rank, out in enumerate(outcomes):
        assert out[method]["ok"], out[method].get("trace")
        assert out[method]["steps"] == STEPS and out[method]["is_main"] == (rank == 0)
    one, two = root / f"single-{method}", root / f"ddp-{method}"
    a, b = load_checkpoint(one), load_checkpoint(two)
    assert a.step == b.step == STEPS
    assert b.meta["extra"]["world_size"] == WORLD and a.meta["extra"]["world_size"] == 1

    # The split exercises what DDP averaging would get wrong: parts of unequal size (7 -> 4 + 3) and
    # a rank without utterances (1 -> 1 + 0); the batches come from the sampler, not the trainer.
    cfg = cfgs[method]
    train = load_split(cfg.data.manifest_dir, "train")
    groups = [train] if method != "pathways-sum" else [[u for u in train if u.language == g] for g in ("en", "fr")]
    for group in groups:
        sizes = [len(batch) for batch in BucketBatchSampler(
            [u.duration for u in group], [u.language for u in group], cfg.batch,
            frames_per_second=cfg.features.frames_per_second).epoch_batches(0)]
        assert any(n % WORLD for n in sizes if n > 1) and 1 in sizes, sizes

    # The same schedule position, pruning events, sparsities and masks (exact).
    for key in ("sampler", "language_samplers"):
        assert a.meta["extra"].get(key) == b.meta["extra"].get(key)
    assert a.meta["extra"]["pruner"] == b.meta["extra"]["pruner"]  # history: steps, levels, sparsity, churn
    pruner_keys = sorted(k for k in a.state_tensors if k.startswith("extra.pruner/"))
    assert pruner_keys == sorted(k for k in b.state_tensors if k.startswith("extra.pruner/"))
    assert any("/mask/" in k for k in pruner_keys)
    for k in pruner_keys:
        assert torch.equal(a.state_tensors[k], b.state_tensors[k]), k

    # Global-batch loss and gradient norm per step: the rank-weighted means equal the single
    # process's to float32 rounding (per-utterance losses summed in another order: ~1e-7 relative;
    # gradients through ~10^2-term sums: ~1e-6). A wrong weighting or a sum instead of a mean is
    # off by >= 10 % here (parts of 4 and 3 utterances, and 1 and 0).
    ma, mb = _metrics(one), _metrics(two)
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == list(range(1, STEPS + 1))
    for key in ("loss", "rnnt", "grad_norm", "frames"):
        torch.testing.assert_close(torch.tensor([r[key] for r in mb]), torch.tensor([r[key] for r in ma]),
                                   rtol=1e-4, atol=0.0, msg=key)

    # Weights. Float rounding perturbs each gradient by ~1e-6 relative; Adam divides the update by
    # sqrt(v), so an entry moves by about that fraction of lr, except where the exact gradient is
    # ~0 and rounding noise is the whole gradient: Adam turns it into steps of up to +-lr. The
    # attention KEY bias is such a null direction (softmax(q.(k + b)) does not depend on b), so its
    # entries are compared only through the total below. Elsewhere: a quarter of one update. In
    # total, the two runs' updates from the dense weights agree to 1 % (rounding: ~1e-4); a
    # mis-weighted mean (4:3 parts weighted 1:1, a 1:0 part halved) changes the update direction
    # by far more, as does a skipped reduction.
    start = load_checkpoint(dense).model
    diff = sum(float((a.model[n] - b.model[n]).square().sum()) for n in a.model) ** 0.5
    moved = sum(float((a.model[n] - start[n]).square().sum()) for n in a.model) ** 0.5
    assert diff <= 1e-2 * moved, (diff, moved)
    for name in a.model:
        x, y = a.model[name], b.model[name]
        if name.endswith("attention.emb_to_key_value.bias"):  # [keys | values]: keep the values
            x, y = x[x.numel() // 2:], y[y.numel() // 2:]
        torch.testing.assert_close(y, x, rtol=0.0, atol=0.25 * LR, msg=name)
    # Only rank 0 wrote: one metrics file, one set of checkpoints (rank 1 appended nothing).
    assert len(_metrics(two)) == STEPS
    assert [p.name for p in list_checkpoints(two)] == [p.name for p in list_checkpoints(one)]


def test_only_rank_0_screens_the_data_and_the_ranks_agree(runs):
    root, _, outcomes = runs
    for out in outcomes:
        assert out["bad-data"]["ok"], out["bad-data"]
    single, ddp = root / "single-bad-data", root / "ddp-bad-data"
    report = json.loads((ddp / "data_report.json").read_text())
    assert report == json.loads((single / "data_report.json").read_text())
    assert report["skipped"]["unreadable_audio"]["count"] == 1 and report["dev_skipped"]["unreadable_audio"]["count"] == 1
    a, b = load_checkpoint(single), load_checkpoint(ddp)
    for k in a.model:  # the same kept data, the same global batches
        torch.testing.assert_close(a.model[k], b.model[k], rtol=0, atol=0.25 * 1e-3, msg=k)


def test_audio_lost_mid_run_weighs_and_skips_batches_as_one_process_does(runs):
    # Each rank's share was n_r / N with N counting the lost items, and a global batch nobody could
    # load still took a (zero) step; a single process trains on what it loaded and skips the rest.
    root, _, outcomes = runs
    for out in outcomes:
        assert out["lost"]["ok"], out["lost"].get("trace")
    ma, mb = _metrics(root / "single-lost"), _metrics(root / "ddp-lost")
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "frames"):
        torch.testing.assert_close(torch.tensor([r[key] for r in mb]), torch.tensor([r[key] for r in ma]),
                                   rtol=1e-4, atol=0.0, msg=key)
    report = json.loads((root / "ddp-lost" / "data_report.json").read_text())
    assert report["unreadable_during_training"]["count"] == 2  # merged over the ranks
    assert report == json.loads((root / "single-lost" / "data_report.json").read_text())


def test_a_diverged_global_batch_is_named_whole_on_every_rank(runs):
    _, cfgs, outcomes = runs
    single = cfgs["_single_nan"]
    assert "step 1, batch 1 (loss nan): " in single
    for out in outcomes:
        assert not out["nan"]["ok"]
        assert out["nan"]["error"] == f"UserError: {single}"  # every utterance, not this rank's part


def test_a_corrupted_mask_on_one_rank_fails_loudly_on_every_rank(runs):
    root, _, outcomes = runs
    for out in outcomes:
        result = out["corrupt"]
        assert not result["ok"]
        assert result["error"].startswith("RuntimeError: pruning masks after step 2 differ across ranks"), result
        assert "rank(s) 1 disagree with rank 0" in result["error"]
    # It failed before the step-2 checkpoint: nothing saved from a diverged model.
    assert list_checkpoints(root / "ddp-corrupt") == []


def _collectives_worker(rank: int, port: int, device: str, report: str) -> None:
    """A one-rank process group on ``device`` (NCCL on CUDA, gloo on CPU) through every collective
    the trainer uses; with one rank each must return its input."""
    from sparse_rnnt.training.distributed import DistEnv, Distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    outcome: dict[str, Any] = {}
    try:
        d = Distributed(DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1), torch.device(device))
        outcome["backend"] = d.backend
        outcome["sums"] = d.sum_values([1.5, -2.0])
        lin = torch.nn.Linear(3, 2).to(device)
        unused = torch.nn.Parameter(torch.ones(2, device=device))
        lin(torch.ones(4, 3, device=device)).square().sum().backward()
        before = [p.grad.clone() for p in lin.parameters()]
        outcome["means"] = d.reduce_gradients([*lin.parameters(), unused], [0.25])
        outcome["grads_kept"] = all(torch.equal(p.grad, g) for p, g in zip(lin.parameters(), before, strict=True))
        outcome["unused_grad_none"] = unused.grad is None
        outcome["on_main"] = d.on_main(lambda: 42, "answer")
        d.check_model(lin, step=3)  # one rank always agrees with itself
        try:
            d.everywhere(lambda: (_ for _ in ()).throw(UserError("bad input")), "fail")
        except UserError as e:
            outcome["user_error"] = str(e)
        d.close()
        outcome["closed"] = not dist.is_initialized()
    except Exception:
        outcome["trace"] = traceback.format_exc()
    Path(report).write_text(json.dumps(outcome))


def _check_collectives(device: str, backend: str, tmp_path: Path) -> None:
    report = tmp_path / "collectives.json"
    mp.spawn(_collectives_worker, args=(_free_port(), device, str(report)), nprocs=1, join=True)
    out = json.loads(report.read_text())
    assert "trace" not in out, out.get("trace")
    assert out == {"backend": backend, "sums": [1.5, -2.0], "means": [0.25], "grads_kept": True,
                   "unused_grad_none": True, "on_main": 42, "user_error": "bad input", "closed": True}


def test_collectives_on_one_gloo_rank(tmp_path):
    _check_collectives("cpu", "gloo", tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_collectives_on_one_nccl_rank(tmp_path):
    # NCCL refuses two ranks on one GPU and the lent machines have one: a one-rank NCCL group is
    # what runs the NCCL paths (CUDA tensors in every collective, objects through the device).
    _check_collectives("cuda", "nccl", tmp_path)
