import json
import subprocess
import sys

import pytest

from sparse_rnnt.cli import build_parser, main

COMMANDS = {
    ("synth",): ["--out", "--languages", "--hours", "--seed", "--format", "--workers"],
    ("data", "mls"): ["--out", "--languages", "--splits", "--subset", "--format"],
    ("tokenizer",): ["--manifest-dir", "--out", "--model-type", "--vocab-size"],
    ("train",): ["--config", "--set", "--out", "--resume", "--print-config"],
    ("eval",): ["--checkpoint", "--manifest-dir", "--split", "--method", "--beam-width", "--out"],
    ("demo",): ["--out", "--hours", "--steps", "--force"],
    ("models",): ["--num-symbols"],
    ("stream",): ["--artifact", "--language", "--chunk-ms", "--device", "--decoding", "--beam-width", "--cuda-graphs",
                  "--quiet"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in COMMANDS[command]:
        assert option in out
    # every option of the parser has a help text
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command[0]]
    if len(command) > 1:
        sub = sub._subparsers._group_actions[0].choices[command[1]]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings


def _run(*args):
    return subprocess.run([sys.executable, "-m", "sparse_rnnt.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--out", "{tmp}/r", "--set", "optim.lrr=1"], "did you mean 'optim.lr'"),
        (["train", "--out", "{tmp}/r", "--config", "{tmp}/missing.yaml"], "config file not found"),
        (["data", "mls", "{tmp}/nowhere", "--out", "{tmp}/m"], "MLS root not found"),
        (["synth", "--out", "{tmp}/s", "--languages", "xx"], "unknown language 'xx'"),
        (["eval", "--checkpoint", "{tmp}/none", "--manifest-dir", "{tmp}"], "checkpoint not found"),
        (["tokenizer", "--manifest-dir", "{tmp}", "--out", "{tmp}/t.model"], "manifest not found"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, message, tmp_path):
    proc = _run(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # nothing half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_pipeline_through_the_cli(tiny_manifests, tmp_path, capsys):
    assert main(["tokenizer", "--manifest-dir", str(tiny_manifests), "--out", str(tmp_path / "tok.model")]) == 0
    assert (tmp_path / "tok.model").is_file()
    assert main(["train", "--out", str(tmp_path / "run"), "--print-config",
                 "--set", f"data.manifest_dir={tiny_manifests}"]) == 0
    assert f"manifest_dir: {tiny_manifests}" in capsys.readouterr().out
    args = ["train", "--out", str(tmp_path / "run"), "--set", f"data.manifest_dir={tiny_manifests}",
            "--set", f"data.tokenizer={tmp_path / 'tok.model'}", "--set", "train.max_steps=2",
            "--set", "train.progress=false", "--set", "batch.max_frames=400", "--set", "data.workers=1"]
    assert main(args) == 0
    capsys.readouterr()
    out_json = tmp_path / "wer.json"
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--manifest-dir", str(tiny_manifests),
                 "--split", "dev", "--languages", "fr", "--quiet", "--out", str(out_json)]) == 0
    table = capsys.readouterr().out
    assert "fr" in table and "avg" in table
    result = json.loads(out_json.read_text())
    assert set(result["per_language"]) == {"fr"}
    assert len(result["hypotheses"]) == 8
    # a second train into the same directory without --resume is refused
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    # eval on a language the model never saw is refused
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--manifest-dir", str(tiny_manifests),
                 "--languages", "it", "--quiet"]) == 2


def test_models_lists_sizes(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "small", "base", "paper-56m", "paper-187m"):
        assert name in out
    assert "76.74M" in out


def test_stream_cuda_graphs_need_a_cuda_device(capsys):
    assert main(["stream", "--artifact", "missing", "a.wav", "--cuda-graphs"]) == 2
    assert "--cuda-graphs needs --device cuda" in capsys.readouterr().err
