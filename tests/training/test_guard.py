import json
import math

import pytest
import torch

from sparse_rnnt.errors import UserError
from sparse_rnnt.training.guard import LossGuard

NAN, INF = float("nan"), float("inf")


def test_finite_losses_proceed_and_bad_ones_are_skipped_and_counted():
    g = LossGuard(max_consecutive=2)
    seq = [1.0, NAN, 2.0, INF, -INF, 0.5, NAN]
    got = [g.check(torch.tensor(v), [f"k{i}"], i) for i, v in enumerate(seq)]
    assert got == [math.isfinite(v) for v in seq]
    assert g.skipped == 4
    assert g.consecutive == 1  # the streak restarted after 0.5


def test_more_than_max_consecutive_raises_naming_steps_and_batches():
    g = LossGuard(max_consecutive=2)
    assert g.check(torch.tensor(3.0), ["en/ok"], 10)
    assert not g.check(torch.tensor(NAN), ["en/a", "fr/b"], 11)
    assert not g.check(torch.tensor(INF), ["en/c"], 12)
    with pytest.raises(UserError) as err:
        g.check(torch.tensor(NAN), ["fr/d"], 13)
    msg = str(err.value)
    assert "11, 12, 13" in msg
    for key in ("en/a", "fr/b", "en/c", "fr/d"):
        assert key in msg
    assert "en/ok" not in msg  # the finite step before the streak is not blamed


def test_zero_tolerance_and_tensor_shapes():
    g = LossGuard(max_consecutive=0)
    assert g.check(torch.tensor([1.0, 2.0]), ["a"], 1)
    with pytest.raises(UserError, match="step"):
        g.check(torch.tensor([1.0, NAN]), ["b"], 2)  # one bad element poisons the loss
    assert LossGuard(3).check(torch.tensor(1.0, dtype=torch.bfloat16), [], 0)
    with pytest.raises(UserError, match="max_consecutive"):
        LossGuard(-1)


def test_skipped_step_leaves_the_model_unchanged_when_used_as_documented():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    g = LossGuard(1)
    loss = model(torch.tensor([[INF, 0.0, 0.0]])).sum()
    opt.zero_grad()
    loss.backward()
    if g.check(loss, ["x"], 1):
        opt.step()
    else:
        opt.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_state_dict_round_trips_through_json_mid_streak():
    g = LossGuard(max_consecutive=2)
    g.check(torch.tensor(NAN), ["a"], 1)
    g.check(torch.tensor(1.0), ["b"], 2)
    g.check(torch.tensor(-INF), ["key-c3"], 3)
    state = json.loads(json.dumps(g.state_dict(), allow_nan=False))  # strict JSON
    h = LossGuard(max_consecutive=2)
    h.load_state_dict(state)
    assert h.skipped == 2 and h.consecutive == 1
    assert not h.check(torch.tensor(NAN), ["d"], 4)
    with pytest.raises(UserError) as err:
        h.check(torch.tensor(NAN), ["e"], 5)  # the restored streak counts: 3, 4, 5
    assert "3, 4, 5" in str(err.value) and "key-c3" in str(err.value)
    with pytest.raises(UserError, match="bad saved state"):
        LossGuard(1).load_state_dict({"streak": []})


def test_batches_skipped_at_the_same_step_are_told_apart():
    # The trainer takes no step after a skipped batch, so a streak repeats one step number.
    g = LossGuard(max_consecutive=2)
    for keys in (["en/a"], ["en/b"]):
        assert not g.check(torch.tensor(NAN), keys, 5)
    with pytest.raises(UserError) as err:
        g.check(torch.tensor(INF), ["en/c"], 5)
    lines = str(err.value).splitlines()
    assert "3 non-finite losses in a row" in lines[0] and lines[0].endswith("at step(s) 5; batches:")
    assert lines[1:4] == ["  step 5, batch 1 (loss nan): en/a", "  step 5, batch 2 (loss nan): en/b",
                          "  step 5, batch 3 (loss inf): en/c"]
