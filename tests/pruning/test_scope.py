"""Pruning scope: which parameters of the model are pruned."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparse_rnnt.errors import UserError
from sparse_rnnt.model import build_model, model_config
from sparse_rnnt.pruning.scope import ScopeConfig, select_parameters

ROOTS = ("rnnt.transcriber.", "rnnt.predictor.", "rnnt.joiner.")


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return build_model(model_config("tiny", ctc_weight=0.3), 40, verbose=False)


def _expected_default(model: nn.Module) -> list[str]:
    """Independent reference: walk modules, keep nn.Linear / nn.LSTM weight matrices under the roots."""
    names = []
    for mod_name, module in model.named_modules():
        if not mod_name.startswith(ROOTS):
            continue
        if isinstance(module, nn.Linear):
            names.append(f"{mod_name}.weight")
        elif isinstance(module, nn.LSTM):
            names += [f"{mod_name}.{n}" for n, _ in module.named_parameters() if n.startswith("weight")]
    order = [n for n, _ in model.named_parameters()]
    return sorted(names, key=order.index)


def test_default_scope_is_linear_weights_of_encoder_predictor_joiner(tiny: nn.Module) -> None:
    selected = select_parameters(tiny, ScopeConfig())
    expected = _expected_default(tiny)
    assert list(selected) == expected
    # The documented list for tiny: 5 Linear per Emformer layer x 4, input/output linear,
    # predictor x2g/p2g/linear, joiner linear.
    assert len(selected) == 26
    assert sum(p.numel() for p in selected.values()) == 1_209_152
    params = dict(tiny.named_parameters())
    for name, p in selected.items():
        assert p is params[name]
        assert p.dim() == 2
        assert not name.endswith("bias")
        assert "norm" not in name and "embedding" not in name and "ctc_head" not in name
    assert "rnnt.predictor.lstm_layers.0.x2g.weight" in selected
    assert "rnnt.predictor.lstm_layers.0.p2g.weight" in selected
    assert "rnnt.joiner.linear.weight" in selected


def test_include_exclude_and_min_size(tiny: nn.Module) -> None:
    only_ffn = select_parameters(tiny, ScopeConfig(include=("*.pos_ff.*",)))
    assert list(only_ffn) == [n for n in _expected_default(tiny) if ".pos_ff." in n]
    assert len(only_ffn) == 8
    no_attn = select_parameters(tiny, ScopeConfig(exclude=("*attention*", "rnnt.joiner.*")))
    assert list(no_attn) == [
        n for n in _expected_default(tiny) if "attention" not in n and not n.startswith("rnnt.joiner.")
    ]
    big = select_parameters(tiny, ScopeConfig(min_size=144 * 144 + 1))
    assert list(big) == [n for n in _expected_default(tiny) if dict(tiny.named_parameters())[n].numel() > 144 * 144]
    enc_only = select_parameters(tiny, ScopeConfig(roots=("rnnt.transcriber",)))
    assert list(enc_only) == [n for n in _expected_default(tiny) if n.startswith("rnnt.transcriber.")]


def test_whole_model_root_includes_ctc_head_and_embedding_on_request(tiny: nn.Module) -> None:
    everything = select_parameters(tiny, ScopeConfig(roots=()))
    assert "ctc_head.weight" in everything
    with_emb = select_parameters(tiny, ScopeConfig(module_types=("Linear", "Embedding")))
    assert "rnnt.predictor.embedding.weight" in with_emb
    assert "rnnt.predictor.embedding.weight" not in select_parameters(tiny)


class _WithLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, num_layers=2, bidirectional=True, proj_size=4)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 3)


def test_torch_lstm_weight_matrices_no_biases() -> None:
    model = _WithLSTM()
    selected = select_parameters(model, ScopeConfig(roots=()))
    expected = [n for n, p in model.named_parameters() if n.startswith("lstm.weight_")] + ["out.weight"]
    assert list(selected) == expected
    assert len(expected) == 13  # 2 layers x 2 directions x (ih, hh, hr) + out.weight


def test_shared_parameter_listed_once() -> None:
    a = nn.Linear(4, 4)
    model = nn.Sequential(a, nn.ReLU(), a)
    assert list(select_parameters(model, ScopeConfig(roots=()))) == ["0.weight"]


def test_errors(tiny: nn.Module) -> None:
    with pytest.raises(UserError, match="empty"):
        select_parameters(tiny, ScopeConfig(include=("nothing.*",)))
    with pytest.raises(UserError, match="empty"):
        select_parameters(tiny, ScopeConfig(module_types=("Conv2d",)))
    with pytest.raises(UserError, match="not a module"):
        select_parameters(tiny, ScopeConfig(roots=("rnnt.encoder",)))
    with pytest.raises(UserError, match="min_size"):
        ScopeConfig(min_size=-1).validate()
    with pytest.raises(UserError, match="module_types"):
        ScopeConfig(module_types=()).validate()
    with pytest.raises(UserError, match="include"):
        ScopeConfig(include="*.weight").validate()  # type: ignore[arg-type]
    # Lists from a YAML config are accepted.
    assert ScopeConfig(include=["*.pos_ff.*"]).include == ("*.pos_ff.*",)  # type: ignore[arg-type]
