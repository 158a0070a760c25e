import json
import pickle

import pytest
import torch
from safetensors import safe_open

from sparse_rnnt.errors import UserError
from sparse_rnnt.training.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_latest_valid,
    save_checkpoint,
)


def _model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LSTM(7, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        out = model[1](model[0](torch.randn(4, 2, 5)))[0].sum()
        opt.zero_grad()
        out.backward()
        opt.step()
    return model, opt


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model, opt = _model_and_optimizer()
    torch.manual_seed(123)
    path = save_checkpoint(tmp_path, 3, model, config={"a": 1}, optimizer=opt, extra={"sampler": {"epoch": 2}})
    expected_draw = torch.rand(4)

    model2, opt2 = _model_and_optimizer(seed=1)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.path == path and ckpt.step == 3 and ckpt.config == {"a": 1}
    model2.load_state_dict(ckpt.model)
    opt2.load_state_dict(ckpt.optimizer_state())
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    ref, got = opt.state_dict(), opt2.state_dict()
    assert ref["param_groups"] == got["param_groups"]
    for k in ref["state"]:
        for name, v in ref["state"][k].items():
            assert torch.equal(v, got["state"][k][name])
    ckpt.restore_rng()
    assert torch.equal(torch.rand(4), expected_draw)
    assert ckpt.meta["extra"]["sampler"] == {"epoch": 2}


def test_files_are_safetensors_and_json_not_pickle(tmp_path):
    model, opt = _model_and_optimizer()
    path = save_checkpoint(tmp_path, 1, model, config={}, optimizer=opt)
    names = sorted(p.name for p in path.iterdir())
    assert names == ["checkpoint.json", "model.safetensors", "state.safetensors"]
    json.loads((path / "checkpoint.json").read_text())
    for f in ("model.safetensors", "state.safetensors"):
        with safe_open(str(path / f), "pt") as h:
            assert len(list(h.keys())) > 0
        with pytest.raises(pickle.UnpicklingError), (path / f).open("rb") as fh:
            pickle.load(fh)


def test_latest_and_keep(tmp_path):
    model, opt = _model_and_optimizer()
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, model, config={}, optimizer=opt, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000020", "step-0000030"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-0000030"
    assert load_checkpoint(tmp_path).step == 30
    # no temporary directories left behind
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-0000020", "step-0000030"]


def test_corruption_is_detected_by_name(tmp_path):
    model, opt = _model_and_optimizer()
    path = save_checkpoint(tmp_path, 1, model, config={}, optimizer=opt)
    good = (path / "model.safetensors").read_bytes()
    data = bytearray(good)
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"model\.safetensors is corrupted"):
        load_checkpoint(path)
    (path / "model.safetensors").write_bytes(good)
    load_checkpoint(path)
    (path / "state.safetensors").unlink()
    with pytest.raises(UserError, match=r"state\.safetensors is missing"):
        load_checkpoint(path)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.pop("config"), "missing config"),
    (lambda m: m.pop("sha256"), "missing sha256"),
    (lambda m: m["sha256"].pop("model.safetensors"), r"no SHA-256 for model\.safetensors"),
    (lambda m: m.update(config=[1]), "config is not a mapping"),
    (lambda m: m.update(step="x"), "corrupt checkpoint metadata"),
])
def test_edited_metadata_is_reported_by_name(tmp_path, edit, message):
    # A checkpoint.json that lost a key loads as corrupt, naming the file, never a KeyError later;
    # hashes cannot be stripped to load the weights unverified.
    model, opt = _model_and_optimizer()
    path = save_checkpoint(tmp_path, 1, model, config={"a": 1}, optimizer=opt)
    meta = json.loads((path / "checkpoint.json").read_text())
    edit(meta)
    (path / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=message) as e:
        load_checkpoint(path)
    assert "checkpoint.json" in str(e.value)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(tmp_path)


def test_failed_write_leaves_previous_checkpoint(tmp_path):
    model, opt = _model_and_optimizer()
    save_checkpoint(tmp_path, 1, model, config={}, optimizer=opt)
    with pytest.raises(FileNotFoundError):
        save_checkpoint(tmp_path, 2, model, config={}, optimizer=opt, files={"x": tmp_path / "does-not-exist"})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000001"]
    assert load_checkpoint(tmp_path).step == 1
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("edit", [
    lambda m: m.update(step=m["step"] + 1),
    lambda m: m["extra"]["sampler"].update(consumed=5),
    lambda m: m["optimizer"]["param_groups"][0].update(lr=0.5),
])
def test_metadata_edits_that_still_parse_are_corruption_and_the_previous_checkpoint_is_used(tmp_path, edit):
    model, opt = _model_and_optimizer()
    for step in (1, 2):
        save_checkpoint(tmp_path, step, model, config={"a": 1}, optimizer=opt,
                        extra={"sampler": {"epoch": 0, "consumed": step}})
    meta_path = tmp_path / "checkpoints" / "step-0000002" / "checkpoint.json"
    meta = json.loads(meta_path.read_text())
    edit(meta)
    meta_path.write_text(json.dumps(meta, indent=2))
    with pytest.raises(UserError, match=r"step-0000002: checkpoint file checkpoint\.json is corrupted"):
        load_checkpoint(meta_path.parent)
    ckpt, problems = load_latest_valid(tmp_path)
    assert ckpt.step == 1 and ckpt.meta["extra"]["sampler"]["consumed"] == 1
    assert len(problems) == 1 and "checkpoint.json is corrupted" in problems[0]


def test_format_1_checkpoints_without_a_metadata_digest_still_load(tmp_path):
    model, opt = _model_and_optimizer()
    path = save_checkpoint(tmp_path, 3, model, config={"a": 1}, optimizer=opt)
    meta = json.loads((path / "checkpoint.json").read_text())
    meta.pop("meta_sha256")
    (path / "checkpoint.json").write_text(json.dumps({**meta, "format_version": 1}))
    assert load_checkpoint(path).step == 3
    (path / "checkpoint.json").write_text(json.dumps({**meta, "format_version": 2}))  # format 2 needs it
    with pytest.raises(UserError, match="missing meta_sha256"):
        load_checkpoint(path)


def test_a_lagging_latest_pointer_does_not_hide_a_newer_sound_checkpoint(tmp_path, caplog):
    # A kill between the rename of step-N and the write of `latest` leaves latest naming the one
    # before: resuming from it redid the work and overwrote the complete step-N.
    model, opt = _model_and_optimizer()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, config={"a": 1}, optimizer=opt, keep=3)
    (tmp_path / "checkpoints" / "latest").write_text("step-0000002\n")
    with caplog.at_level("WARNING"):
        ckpt, problems = load_latest_valid(tmp_path)
    assert ckpt.step == 3 and load_checkpoint(tmp_path).step == 3
    assert problems == [f"{tmp_path / 'checkpoints' / 'latest'}: names step-0000002, but step-0000003 is newer "
                        "(a write cut between the two?): the newest is tried first"]
    assert problems[0] in caplog.text
