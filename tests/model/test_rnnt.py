import re

import pytest
import torch
from torchaudio.functional import rnnt_loss
from torchaudio.models import emformer_rnnt_base

from sparse_rnnt.errors import UserError
from sparse_rnnt.model import MODEL_SIZES, build_model, count_parameters, model_config
from sparse_rnnt.model.decoding import beam_search, greedy_search


def _inputs(seed=0, batch=3, frames=(96, 72, 40), vocab=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, max(frames), 80, generator=g)
    for b, n in enumerate(frames):
        x[b, n:] = 0  # batches are zero-padded
    lengths = torch.tensor(frames, dtype=torch.int32)
    u = (7, 5, 2)
    y = torch.randint(0, vocab - 1, (batch, max(u)), generator=g, dtype=torch.int32)
    for b, n in enumerate(u):
        y[b, n:] = 0
    return x, lengths, y, torch.tensor(u, dtype=torch.int32)


def test_base_matches_torchaudio_parameter_count():
    with torch.device("meta"):
        ours = build_model(MODEL_SIZES["base"], 4097, verbose=False)
        ref = emformer_rnnt_base(num_symbols=4097)
    assert count_parameters(ours) == count_parameters(ref) == 76_738_049


@pytest.mark.parametrize("name,low,high", [("tiny", 1.0e6, 1.5e6), ("small", 15e6, 25e6)])
def test_named_sizes(name, low, high):
    vocab = 40 if name == "tiny" else 1025
    n = count_parameters(build_model(MODEL_SIZES[name], vocab, verbose=False))
    assert low < n < high


def test_paper_sizes_have_paper_parameter_counts():
    # Built on the meta device: only shapes matter for the count.
    with torch.device("meta"):
        n56 = count_parameters(build_model(MODEL_SIZES["paper-56m"], 4097, verbose=False))
        n187 = count_parameters(build_model(MODEL_SIZES["paper-187m"], 4097, verbose=False))
    assert abs(n56 - 56e6) / 56e6 < 0.05
    assert abs(n187 - 187e6) / 187e6 < 0.05


def test_build_prints_parameter_count(capsys):
    m = build_model(MODEL_SIZES["tiny"], 30)
    assert f"{count_parameters(m):,} parameters" in capsys.readouterr().out


def test_loss_equals_torchaudio_reference():
    torch.manual_seed(0)
    model = build_model(model_config("tiny"), 12, verbose=False).eval()
    x, xl, y, yl = _inputs()
    out = model(x, xl, y, yl)
    # Reference: torchaudio's RNNT.forward on right-context-padded input and blank-prefixed targets.
    padded = torch.nn.functional.pad(x, (0, 0, 0, model.config.right_context_length))
    prefixed = torch.cat([torch.full((3, 1), 11, dtype=torch.int32), y], dim=1)
    logits, src_len, _, _ = model.rnnt(padded, xl, prefixed, yl + 1)
    ref = rnnt_loss(logits, y, src_len.int(), yl, blank=11, reduction="none")
    torch.testing.assert_close(out.per_utterance, ref)
    torch.testing.assert_close(out.loss, ref.mean())


@pytest.mark.parametrize("lengths", [(57, 41, 22), (96, 71, 38), (13, 12, 9)])
def test_encoder_output_does_not_depend_on_the_batch(lengths):
    torch.manual_seed(0)
    model = build_model(model_config("tiny", transformer_num_layers=2), 12, verbose=False).eval()
    x, xl, _, _ = _inputs(frames=lengths)
    with torch.no_grad():
        enc, enc_len = model.encode(x, xl)
        for b, n in enumerate(lengths):
            alone, alone_len = model.encode(x[b : b + 1, :n], xl[b : b + 1])
            assert int(alone_len[0]) == int(enc_len[b]) == n // 4
            torch.testing.assert_close(enc[b, : n // 4], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frames", [(96, 3, 40), (2, 72, 0)])
def test_items_without_an_encoder_frame_are_refused_by_position(frames):
    # Fewer than time_reduction_stride (4) feature frames: no encoder frame after the reduction.
    model = build_model(model_config("tiny", transformer_num_layers=1), 12, verbose=False)
    x, xl, y, yl = _inputs(frames=frames)
    short = [b for b, n in enumerate(frames) if n < 4]
    with pytest.raises(ValueError, match=re.escape(f"batch item(s) {short} have fewer than 4 feature frames")):
        model(x, xl, y, yl)
    ok = [b for b, n in enumerate(frames) if n >= 4]
    u = int(yl[ok].max())
    assert torch.isfinite(model(x[ok], xl[ok], y[ok][:, :u], yl[ok]).loss)  # the rest is fine


def test_ctc_head_adds_weighted_ctc_loss():
    torch.manual_seed(0)
    model = build_model(model_config("tiny", ctc_weight=0.5), 12, verbose=False).eval()
    x, xl, y, yl = _inputs()
    out = model(x, xl, y, yl)
    enc, enc_len = model.encode(x, xl)
    lp = model.ctc_head(enc).log_softmax(-1).transpose(0, 1)
    ctc = torch.nn.functional.ctc_loss(lp, y, enc_len, yl, blank=11, reduction="none", zero_infinity=True)
    torch.testing.assert_close(out.ctc, ctc.mean())
    torch.testing.assert_close(out.loss, out.rnnt + 0.5 * ctc.mean())
    out.loss.backward()
    assert model.ctc_head.weight.grad is not None


def _reference_greedy(model, x, n, max_symbols=4):
    """One utterance, written independently of the batched implementation."""
    rnnt = model.rnnt
    enc, enc_len = model.encode(x[None, :n], torch.tensor([n], dtype=torch.int32))
    one = torch.ones(1, dtype=torch.int32)
    pred, _, state = rnnt.predict(torch.tensor([[model.blank]], dtype=torch.int32), one, None)
    out = []
    for t in range(int(enc_len[0])):
        for _ in range(max_symbols):
            logits, _, _ = rnnt.join(enc[:, t : t + 1], one, pred, one)
            k = int(logits[0, 0, 0].argmax())
            if k == model.blank:
                break
            out.append(k)
            pred, _, state = rnnt.predict(torch.tensor([[k]], dtype=torch.int32), one, state)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_greedy_equals_per_utterance_reference(seed):
    torch.manual_seed(seed)
    model = build_model(model_config("tiny"), 12, verbose=False).eval()
    # Bias the joiner towards emitting so that the predictor state matters.
    with torch.no_grad():
        model.rnnt.joiner.linear.bias[-1] -= 1.0
    x, xl, _, _ = _inputs(seed)
    hyps = greedy_search(model, x, xl)
    for b in range(3):
        ref = _reference_greedy(model, x[b], int(xl[b]))
        assert hyps[b] == ref
    assert sum(len(h) for h in hyps) > 0


def test_beam_search_outputs_valid_tokens():
    torch.manual_seed(0)
    model = build_model(model_config("tiny"), 12, verbose=False).eval()
    x, xl, _, _ = _inputs()
    hyps = beam_search(model, x, xl, beam_width=3)
    assert len(hyps) == 3
    assert all(0 <= t < 11 for h in hyps for t in h)


def test_beam_width_up_to_the_non_blank_symbols():
    # torchaudio's search takes the top beam_width of the first frame's non-blank tokens: 11 of 12
    # symbols here is the widest beam that runs; wider is a clear error, not "index out of range".
    torch.manual_seed(0)
    model = build_model(model_config("tiny"), 12, verbose=False).eval()
    x, xl, _, _ = _inputs()
    assert len(beam_search(model, x[:1], xl[:1], beam_width=11)) == 1
    with pytest.raises(UserError, match="beam width 12 exceeds the model's 11 non-blank symbols"):
        beam_search(model, x[:1], xl[:1], beam_width=12)


def test_config_validation():
    with pytest.raises(UserError, match="divisible"):
        model_config("tiny", transformer_num_heads=5)
    with pytest.raises(UserError, match="unknown model size"):
        model_config("huge")
    with pytest.raises(UserError, match="unknown model option"):
        model_config("tiny", layers=3)
