import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sparse_rnnt.cli import build_parser, main


def _leaf_parsers(parser, prefix=()):
    """``{("data", "mls"): parser, ("train",): parser, ...}``: every command's own parser."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {prefix: parser}
    out = {}
    for name, sub in subs[0].choices.items():
        out.update(_leaf_parsers(sub, (*prefix, name)))
    return out


LEAVES = _leaf_parsers(build_parser())


@pytest.mark.parametrize("command", list(LEAVES), ids=" ".join)
def test_help_explains_every_option(command, capsys):
    # Every option of every command has a help text, and `--help` shows it.
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    options = [a for a in LEAVES[command]._actions if a.option_strings and a.dest != "help"]
    assert options
    for action in options:
        assert action.help, action.option_strings
        assert any(re.search(rf"{re.escape(o)}(?![\w-])", out) for o in action.option_strings), action.option_strings


def test_readme_command_table_lists_every_option_and_no_other():
    # The README's command table (one row per command, its usage line in backticks) names every
    # option the parser has, and none it lacks: the docs cannot drift from the CLI either way.
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    rows = {}
    for line in readme.splitlines():
        m = re.match(r"\| `sparse-rnnt ([^`]*)` \|", line)
        if m:
            rows[m.group(1)] = set(re.findall(r"--[a-z][a-z0-9-]*", m.group(1)))
    assert len(LEAVES) >= 11
    for command, parser in LEAVES.items():
        usage = [r for r in rows if r.split(" --")[0].split(" ")[:len(command)] == list(command)]
        assert len(usage) == 1, (command, usage)
        options = {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
        assert rows[usage[0]] == options, (command, sorted(options - rows[usage[0]]), sorted(rows[usage[0]] - options))


def _shown_default_matches(shown: str, default) -> bool:
    """A default as the docs write it (``0.5``, ``1e-3``, ``greedy``, ``0,1``) against the value."""
    if isinstance(default, (tuple, list)):
        default = ",".join(str(x) for x in default)
    try:
        return float(shown) == float(default)
    except (TypeError, ValueError):
        return shown == str(default)


def _effective_default(command, action):
    """The parser's default, or for ``prune``'s options (None: keep the config's) the config's."""
    if action.default is None and command == ("prune",):
        import dataclasses

        from sparse_rnnt.pruning.methods import PruningConfig

        fields = {f.name: f for f in dataclasses.fields(PruningConfig)}
        f = fields.get(action.dest)
        if f is not None and f.default is not dataclasses.MISSING and not isinstance(f.default, dict):
            return f.default
    return action.default


DEVICE_SPECS = {"auto", "cpu", "cuda", "cuda:N"}


def test_documented_defaults_and_choices_are_the_parsers():
    # A default quoted in `--help` ("(default 4)") or in the README's command table
    # ("[--beam-width 4]"), and the alternatives the table lists ("greedy|beam"), are the parser's
    # (or, for prune's options that default to the dense run's config, PruningConfig's).
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    compared = 0
    for line in readme.splitlines():
        m = re.match(r"\| `sparse-rnnt ([^`]*)` \|", line)
        if not m:
            continue
        usage = m.group(1)
        command = next(c for c in LEAVES if usage.split(" --")[0].split(" ")[:len(c)] == list(c))
        actions = {o: a for a in LEAVES[command]._actions for o in a.option_strings}
        for opt, shown in re.findall(r"\[(--[a-z][a-z0-9-]*) ([^\]\s]+)\]", usage):
            action = actions[opt]
            if "\\|" in shown:
                listed = set(shown.split("\\|"))
                if opt == "--device":
                    assert listed == DEVICE_SPECS, (command, opt, listed)
                elif action.choices:
                    assert listed == set(action.choices), (command, opt, listed)
                compared += 1
                continue
            default = _effective_default(command, action)
            if default is None or shown.isupper() or len(shown) == 1 or shown == "...":
                continue  # a placeholder (N, FILE, T, n), or an example value of an optional input
            assert _shown_default_matches(shown, default), (command, opt, shown, default)
            compared += 1
    for command, parser in LEAVES.items():
        for action in parser._actions:
            default = _effective_default(command, action)
            for quoted in re.findall(r"\(default:? ([^)]*)\)", action.help or ""):
                first = re.split(r"[\s;]", quoted)[0].rstrip(",:")
                if default is None or first in ("all", "each", "auto"):
                    continue  # "all four", "each format's own kernel", "auto" for 0: described in words
                assert _shown_default_matches(first, default), (command, action.option_strings, quoted, default)
                compared += 1
    assert compared > 60


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
    # Counted on the meta device: the same as a real model's parameters.
    from sparse_rnnt.model import MODEL_SIZES, build_model

    real = sum(p.numel() for p in build_model(MODEL_SIZES["tiny"], 4097, verbose=False).parameters())
    assert f"tiny {real / 1e6:12.2f}M".replace(" ", "") in out.replace(" ", "")


def test_stream_cuda_graphs_need_a_cuda_device(capsys):
    assert main(["stream", "--artifact", "missing", "a.wav", "--cuda-graphs"]) == 2
    assert "--cuda-graphs needs --device cuda" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["eval", "--checkpoint", "c", "--manifest-dir", "m", "--beam-width", "0"], "--beam-width: must be >= 1"),
        (["eval", "--checkpoint", "c", "--manifest-dir", "m", "--device", "gpu0"], "expected auto, cpu, cuda or cuda:N"),
        (["stream", "--artifact", "a", "x.wav", "--chunk-ms", "nan"], "finite positive"),
        (["stream", "--artifact", "a", "x.wav", "--chunk-ms", "inf"], "finite positive"),
        (["stream", "--artifact", "a", "x.wav", "--threads", "100000"], "--threads: must be <="),
        (["export", "--checkpoint", "c", "--out", "o", "--tolerance", "nan"], "finite positive"),
        (["models", "--num-symbols", "1"], "must be >= 2"),
        (["models", "--num-symbols", "99999999999"], "must be <= 1,000,000"),
        (["synth", "--out", "s", "--workers", "100000"], "--workers: must be <="),
    ],
)
def test_bad_option_values_are_refused_by_the_parser(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("chunk_ms", ["1e308", "3600001"])
def test_stream_chunk_above_an_hour_is_a_user_error(chunk_ms, tmp_path, capsys):
    # Checked before the audio or the artifact is read (neither exists here).
    assert main(["stream", "--artifact", str(tmp_path / "a"), str(tmp_path / "x.wav"), "--chunk-ms", chunk_ms]) == 2
    assert "--chunk-ms must be a positive number of at most 3600000" in capsys.readouterr().err


def _cuda_device_this_machine_lacks() -> str:
    import torch

    return f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"


def test_missing_cuda_and_bad_block_are_user_errors_before_any_work(tmp_path, capsys, monkeypatch):
    import sparse_rnnt.demo

    def demo_ran(*args, **kwargs):  # fail at once rather than train the demo when the check comes late
        raise AssertionError("reproduce started the demo before checking --device")

    monkeypatch.setattr(sparse_rnnt.demo, "run_demo", demo_ran)
    dev = _cuda_device_this_machine_lacks()
    assert main(["eval", "--checkpoint", str(tmp_path / "none"), "--manifest-dir", str(tmp_path), "--device", dev]) == 2
    assert f"--device {dev}:" in capsys.readouterr().err  # said before the missing checkpoint
    assert main(["stream", "--artifact", str(tmp_path / "none"), "x.wav", "--device", dev]) == 2
    assert f"--device {dev}:" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "a"), "--device", dev]) == 2
    assert f"--device {dev}:" in capsys.readouterr().err
    # reproduce without --dense starts with the demo: the device is refused before it
    assert main(["reproduce", "--scenario", "1", "--out", str(tmp_path / "r"), "--device", dev, "--quiet"]) == 2
    assert f"--device {dev}:" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "a"), "--format", "bsr",
                 "--block", "300x16"]) == 2
    assert "H and W in 1..256" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_output_files_are_checked_before_the_work_and_never_overwrite_inputs(tiny_manifests, tmp_path, capsys):
    manifest = tiny_manifests / "train.jsonl"
    before = manifest.read_bytes()
    assert main(["tokenizer", "--manifest-dir", str(tiny_manifests), "--out", str(manifest)]) == 2
    assert "would overwrite an input" in capsys.readouterr().err
    assert manifest.read_bytes() == before
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "checkpoint.json").write_text("{}")
    cases = [
        (ckpt / "checkpoint.json", "would overwrite an input"),
        (tiny_manifests / "dev.jsonl", "would overwrite an input"),
        (tmp_path, "is a directory"),
        (tmp_path / "nowhere" / "wer.json", "does not exist"),
    ]
    for out, message in cases:  # refused before the (missing) model is even loaded
        assert main(["eval", "--checkpoint", str(ckpt), "--manifest-dir", str(tiny_manifests),
                     "--out", str(out)]) == 2
        assert message in capsys.readouterr().err, out
    assert (ckpt / "checkpoint.json").read_text() == "{}"
    # a new file beside the inputs is fine: the tokenizer lands in the manifest directory
    assert main(["tokenizer", "--manifest-dir", str(tiny_manifests), "--out", str(tiny_manifests / "t.model")]) == 0
    (tiny_manifests / "t.model").unlink()
    (tiny_manifests / "t.vocab").unlink(missing_ok=True)


def test_filesystem_errors_on_user_paths_are_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = _run("synth", "--out", str(tmp_path / "afile" / "sub"), "--hours", "0.001", "--languages", "en")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Not a directory" in proc.stderr and str(tmp_path / "afile") in proc.stderr


def test_print_config_needs_no_out_but_training_does(capsys):
    assert main(["train", "--print-config", "--set", "train.max_steps=7"]) == 0
    assert "max_steps: 7" in capsys.readouterr().out
    assert main(["train", "--set", "train.max_steps=7"]) == 2
    assert "--out RUN is required" in capsys.readouterr().err


def test_data_mls_with_no_readable_audio_reports_then_fails_in_one_line(tmp_path):
    from tests.data.mls_fixture import build_mls_fixture

    fx = build_mls_fixture(tmp_path / "mls", languages=("en",), splits=("dev",), per_split=2)
    for u in fx["utterances"]["en"]["dev"]:
        Path(u["audio"]).write_bytes(b"not audio")
    proc = _run("data", "mls", str(fx["root"]), "--splits", "dev", "--out", str(tmp_path / "m"), "--quiet")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "error: no usable utterances under" in lines[-1] and "nothing written" in lines[-1]
    report = "\n".join(lines[:-1])
    for u in fx["utterances"]["en"]["dev"]:
        assert u["id"] in report  # the report names every skipped utterance
    assert not (tmp_path / "m").exists()


# -- audit fixes ----------------------------------------------------------------------------


def test_device_auto_is_resolved_before_export_and_stream(tmp_path, monkeypatch, capsys):
    # `--device auto` reached torch.device("auto") inside export and stream: a RuntimeError traceback.
    import sparse_rnnt.export
    import sparse_rnnt.streaming.files
    from sparse_rnnt.errors import UserError
    from sparse_rnnt.training.trainer import resolve_device

    seen = {}

    def fake_export(checkpoint, out, opts):
        seen["export"] = opts.device
        raise UserError("stop here")

    def fake_stream(artifact, audio, **kwargs):
        seen["stream"] = kwargs["device"]
        raise UserError("stop here")

    monkeypatch.setattr(sparse_rnnt.export, "export_checkpoint", fake_export)
    monkeypatch.setattr(sparse_rnnt.streaming.files, "stream_files", fake_stream)
    assert main(["export", "--checkpoint", str(tmp_path / "c"), "--out", str(tmp_path / "a"), "--device", "auto"]) == 2
    assert main(["stream", "--artifact", str(tmp_path / "a"), "x.wav", "--device", "auto"]) == 2
    assert "stop here" in capsys.readouterr().err
    assert seen == {"export": str(resolve_device("auto")), "stream": str(resolve_device("auto"))}
    assert seen["export"] in ("cpu", "cuda")


def test_outputs_beside_the_inputs_may_be_rewritten(tiny_manifests, tmp_path, capsys):
    # A second `tokenizer --out MANIFESTS/tok.model` (or `eval --out RUN/wer.json`) was refused as
    # "would overwrite an input": every file under an input directory counted as one.
    out = tiny_manifests / "tok.model"
    try:
        for _ in range(2):
            assert main(["tokenizer", "--manifest-dir", str(tiny_manifests), "--out", str(out)]) == 0, \
                capsys.readouterr().err
    finally:
        out.unlink(missing_ok=True)
        out.with_suffix(".vocab").unlink(missing_ok=True)
    # A run directory: its earlier wer.json is no input; its checkpoints' files are.
    step = tmp_path / "run" / "checkpoints" / "step-0000002"
    step.mkdir(parents=True)
    (step / "checkpoint.json").write_text("{}")
    (tmp_path / "run" / "wer.json").write_text("{}")
    for target, refused in ((tmp_path / "run" / "wer.json", False), (step / "checkpoint.json", True)):
        assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--manifest-dir", str(tiny_manifests),
                     "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert ("would overwrite an input" in err) == refused, err
        if not refused:
            assert "step-0000002" in err  # it went on to read the (fake) checkpoint
    assert (step / "checkpoint.json").read_text() == "{}"


def test_models_into_a_closed_pipe_exits_quietly():
    # `sparse-rnnt models | head -1` printed a BrokenPipeError traceback.
    import os

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # every line is written at once, as to a terminal
    proc = subprocess.Popen([sys.executable, "-m", "sparse_rnnt.cli", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"parameter counts")
    proc.stdout.close()  # what `head -1` does after its line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) != 0
    assert err == "", err


def test_verbose_goes_before_or_after_the_command_and_sets_only_the_toolkits_logger():
    # -v after the command was "unrecognized arguments"; before it, DEBUG went to every library.
    code = ("import logging, sys; from sparse_rnnt.cli import main; rc = main(sys.argv[1:]); "
            "print(rc, logging.getLogger('sparse_rnnt').getEffectiveLevel(), logging.getLogger().level, "
            "logging.getLogger('matplotlib').getEffectiveLevel())")
    for argv in (["-v", "train", "--print-config"], ["train", "--print-config", "-v"],
                 ["train", "--verbose", "--print-config"]):
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        rc, ours, root, other = proc.stdout.strip().splitlines()[-1].split()
        assert (rc, int(ours)) == ("0", 10), argv
        assert int(root) > 10 and int(other) > 10, argv
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "-v`/`--verbose`" in readme


def test_prune_print_config_needs_no_out_but_pruning_does(tmp_path, capsys):
    # `prune --print-config` required --out, unlike `train --print-config`.
    assert main(["prune", "--method", "imp", "--init", str(tmp_path / "nope"), "--print-config"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["prune", "--method", "imp", "--init", str(tmp_path / "nope")]) == 2
    assert "--out RUN is required" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "override", "message"),
    [
        (["--steps", "5"], "train.max_steps=9", "--set train.max_steps=9 conflicts with --steps 5"),
        (["--steps", "5"], "train={max_steps: 9}", "--set train={max_steps: 9} conflicts with --steps 5"),
        (["--languages", "en"], "data.languages=fr", "--set data.languages=fr conflicts with --languages en"),
        (["--interval", "10"], "pruning.interval=20", "conflicts with --interval 10"),
        (["--granularity", "2:4"], "pruning.granularity.kind=block", "conflicts with --granularity 2:4"),
        ([], "pruning.method=lth", "--set pruning.method=lth conflicts with --method imp"),
    ],
)
def test_prune_refuses_a_set_that_contradicts_an_explicit_option(options, override, message):
    from sparse_rnnt.cli import prune_config
    from sparse_rnnt.config import load_config, to_dict
    from sparse_rnnt.errors import UserError

    args = build_parser().parse_args(["prune", "--method", "imp", "--init", "d", "--out", "o", "--levels", "0.5",
                                      *options, "--set", override])
    dense = to_dict(load_config(None, ["data.manifest_dir=m"]))
    with pytest.raises(UserError, match=re.escape(message)):
        prune_config(args, dense)
    # Without the option the --set applies.
    args = build_parser().parse_args(["prune", "--method", "imp", "--init", "d", "--out", "o", "--levels", "0.5",
                                      "--set", "train.max_steps=9"])
    assert prune_config(args, dense).train.max_steps == 9
    # An empty section sets nothing, so it contradicts no option.
    args = build_parser().parse_args(["prune", "--method", "imp", "--init", "d", "--out", "o", "--levels", "0.5",
                                      "--languages", "en", "--set", "data={}"])
    assert prune_config(args, dense).data.languages == ("en",)


def test_verbose_between_a_commands_files_does_not_split_them(monkeypatch):
    # `stream --artifact A a.wav -v b.wav` was "unrecognized arguments: b.wav".
    import sparse_rnnt.streaming.files as files_mod

    seen = []

    def fake(artifact, paths, **kwargs):
        seen.append(list(paths))
        return [], {"steps": 0, "p50_s": 0.0, "p99_s": 0.0, "rtf": float("nan")}

    monkeypatch.setattr(files_mod, "stream_files", fake)
    assert main(["stream", "--artifact", "A", "a.wav", "-v", "b.wav", "--quiet"]) == 0
    assert seen == [["a.wav", "b.wav"]]
    import logging

    assert logging.getLogger("sparse_rnnt").level == logging.DEBUG
    assert main(["stream", "--artifact", "A", "a.wav", "--quiet"]) == 0
    assert logging.getLogger("sparse_rnnt").level == logging.NOTSET


def test_feature_workers_ignore_ctrl_c(monkeypatch):
    # Ctrl-C reaches every process of the terminal's group: a pool worker printed its own
    # KeyboardInterrupt traceback while the CLI reported "interrupted".
    import signal

    import torch

    import sparse_rnnt.data.features as features

    threads, handler = torch.get_num_threads(), signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(features, "_worker_logmel", None)
    try:
        features._init_worker(features.FeatureConfig())
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, handler)
        torch.set_num_threads(threads)


def test_demo_force_help_says_what_it_replaces(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "only a directory a demo wrote" in out
