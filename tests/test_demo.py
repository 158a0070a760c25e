import json
from pathlib import Path

import pytest

from sparse_rnnt.demo import DEMO_MARKER, DemoOptions, run_demo, validate_options
from sparse_rnnt.errors import UserError


def test_demo_pipeline_end_to_end_small(tmp_path, capsys):
    """The whole pipeline at toy size: synth -> manifests -> tokenizer -> train -> eval."""
    out = tmp_path / "demo"
    summary = run_demo(DemoOptions(out=out, hours=0.01, steps=3, progress=False))
    printed = capsys.readouterr().out
    assert "Test WER (%)" in printed and "avg" in printed
    for key in ("corpus", "manifests", "tokenizer", "run", "checkpoint", "test_results"):
        assert Path(summary["paths"][key]).exists(), key
    saved = json.loads((out / "demo_summary.json").read_text())
    assert saved["test_average_wer"] == pytest.approx(summary["test_average_wer"])
    results = json.loads((out / "test_wer.json").read_text())
    assert set(results["per_language"]) == {"en", "fr", "it", "nl"}
    assert results["step"] == 3
    # a second run refuses to overwrite without --force
    with pytest.raises(UserError, match="--force"):
        run_demo(DemoOptions(out=out, hours=0.01, steps=3, progress=False))
    # ... but with --force it may: the demo marked the directory as its own.
    assert (out / DEMO_MARKER).is_file()
    assert validate_options(DemoOptions(out=out, hours=0.01, steps=3, force=True)) == (0.01, 3)


@pytest.mark.slow
def test_demo_model_really_learns(tmp_path):
    """A shortened demo (about 4 minutes on 2 cores) must already be far from chance."""
    summary = run_demo(DemoOptions(out=tmp_path / "demo", hours=0.3, steps=1200, progress=False))
    assert summary["test_average_wer"] < 0.6
