import pytest
import torch

from sparse_rnnt.data.audio import load_audio
from sparse_rnnt.data.features import FeatureConfig, GlobalCMVN, LogMel
from sparse_rnnt.data.manifest import load_split
from sparse_rnnt.data.tokenizer import Tokenizer, TokenizerConfig
from sparse_rnnt.model import build_model, model_config
from sparse_rnnt.training.evaluate import evaluate
from sparse_rnnt.training.metrics import word_errors


@pytest.fixture(scope="module")
def setup(tiny_manifests, tmp_path_factory):
    train = load_split(tiny_manifests, "train")
    tok = Tokenizer.train([u.text for u in train], TokenizerConfig(), tmp_path_factory.mktemp("tok") / "t.model")
    cmvn = GlobalCMVN.fit(LogMel()(load_audio(u.audio)) for u in train)
    torch.manual_seed(0)
    model = build_model(model_config("tiny", transformer_num_layers=2), tok.num_symbols, verbose=False).eval()
    with torch.no_grad():  # emit often so hypotheses are not all empty
        model.rnnt.joiner.linear.bias[-1] -= 3.0
    return model, tok, cmvn, load_split(tiny_manifests, "dev")


def test_counts_are_the_word_errors_of_the_hypotheses(setup):
    model, tok, cmvn, dev = setup
    res = evaluate(model, dev, tok, cmvn, FeatureConfig(), progress=False)
    assert len(res.hypotheses) == len(dev)
    for lang in ("en", "fr"):
        hyps = [h for h in res.hypotheses if h["key"].startswith(lang + "/")]
        ref = word_errors([h["reference"] for h in hyps], [h["hypothesis"] for h in hyps])
        assert res.per_language[lang].to_dict() == ref.to_dict()
    assert res.average_wer == pytest.approx((res.per_language["en"].wer + res.per_language["fr"].wer) / 2)
    assert any(h["hypothesis"] for h in res.hypotheses)


def test_batching_does_not_change_hypotheses(setup):
    model, tok, cmvn, dev = setup
    big = evaluate(model, dev, tok, cmvn, FeatureConfig(), progress=False, max_frames=100000)
    one = evaluate(model, dev, tok, cmvn, FeatureConfig(), progress=False, max_frames=1)
    assert big.hypotheses == one.hypotheses


def test_nfd_references_of_hand_built_utterances_score_a_perfect_hypothesis_zero(tmp_path, monkeypatch):
    # read_manifest gives NFC text; an Utterance built by hand with NFD text must score the same.
    import unicodedata

    import sparse_rnnt.training.evaluate as ev
    from sparse_rnnt.data.manifest import Utterance

    ref = unicodedata.normalize("NFD", "le café était très fermé")
    utts = [Utterance(id=f"1_1_{i:06d}", language="fr", split="dev", audio="/unused.flac", duration=1.0,
                      text=ref, speaker="1", book="1") for i in range(2)]
    tok = Tokenizer.train([ref, "a b c"], TokenizerConfig(), tmp_path / "t.model")
    oracle = tok.encode(ref)  # a decoder that emits exactly the reference's tokens
    monkeypatch.setattr(ev, "decode", lambda model, x, lengths, **kw: [list(oracle) for _ in range(x.size(0))])
    res = evaluate(torch.nn.Linear(1, 1), utts, tok, GlobalCMVN(torch.zeros(80), torch.ones(80)), FeatureConfig(),
                   features={u.key: torch.zeros(100, 80) for u in utts}, progress=False)
    assert res.hypotheses[0]["hypothesis"] == unicodedata.normalize("NFC", ref)
    assert res.per_language["fr"].wer == 0.0
