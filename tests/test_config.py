import re

import pytest

from sparse_rnnt.config import ExperimentConfig, dump_config, load_config, parse_overrides, to_dict
from sparse_rnnt.errors import UserError
from sparse_rnnt.model.configs import MODEL_SIZES


def test_defaults_validate():
    cfg = load_config()
    assert cfg == ExperimentConfig()


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.01\nmodel:\n  name: small\n  transformer_num_layers: 3\ndata:\n  languages: [en, fr]\n")
    cfg = load_config(p, ["optim.lr=2e-4", "train.max_steps=7", "batch.mode=monolingual"])
    assert cfg.optim.lr == 2e-4
    assert cfg.train.max_steps == 7
    assert cfg.batch.mode == "monolingual"
    assert cfg.data.languages == ("en", "fr")
    # A named size with a field override keeps the rest of that size.
    assert cfg.model.transformer_num_layers == 3
    assert cfg.model.encoding_dim == MODEL_SIZES["small"].encoding_dim
    # Comma lists from the command line.
    assert load_config(None, ["data.languages=it,nl"]).data.languages == ("it", "nl")


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["model.name=base", "optim.betas=[0.8, 0.9]", "train.seed=3"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg
    assert to_dict(load_config(p)) == to_dict(cfg)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.lrr=1"], "did you mean 'optim.lr'"),
        (["optimm.lr=1"], "unknown config key 'optimm'"),
        (["optim.lr=abc"], "optim.lr: expected a number"),
        (["train.max_steps=1.5"], "expected an integer"),
        (["train.max_steps=0"], "max_steps must be positive"),
        (["train.progress=maybe"], "expected true or false"),
        (["model.name=huge"], "unknown model size"),
        (["optim.betas=[0.9]"], "expected 2 values"),
        (["optim.schedule=linear"], "optim.schedule"),
        (["noequals"], "key=value"),
        (["pruning.method=lap", "batch.mode=monolingual"], "lap .* needs batch.mode=mixed"),
        (["pruning.method=dynamic-pathways"], "needs batch.mode=monolingual"),
        (["data.languages=en,fr,en"], "data.languages lists 'en' more than once"),
        (["data.languages=[en, '  ']"], "data.languages must be language codes"),
    ],
)
def test_bad_config_is_a_clear_user_error(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(lst)


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_config(path)
        assert cfg.model.name in MODEL_SIZES


def test_demo_recipe_matches_tiny_cpu_config():
    from pathlib import Path

    from sparse_rnnt.demo import DEMO_STEPS, DEMO_TRAIN_OVERRIDES

    shipped = load_config(Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml")
    demo = load_config(None, ["data.manifest_dir=manifests", f"train.max_steps={DEMO_STEPS}", *DEMO_TRAIN_OVERRIDES])
    assert to_dict(shipped) == to_dict(demo)


def test_readme_configuration_example_is_a_valid_config():
    # The README's configuration block must stay in step with the config classes.
    from pathlib import Path

    import yaml

    from sparse_rnnt.config import config_from_tree, to_dict

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    block = text[text.index("```yaml") + len("```yaml"):]
    tree = yaml.safe_load(block[: block.index("```")])
    cfg = config_from_tree(tree)
    assert cfg.pruning is not None and cfg.pruning.method == tree["pruning"]["method"]
    # Every value shown is the default (the two the example has to choose aside), nested ones too.
    chosen = {"data": {"manifest_dir": tree["data"]["manifest_dir"]}, "pruning": {"method": tree["pruning"]["method"]}}
    defaults = to_dict(config_from_tree(chosen))

    def same(shown, default, where):
        if isinstance(shown, dict):
            assert isinstance(default, dict), where
            for key, value in shown.items():
                assert key in default, f"{where}.{key}"
                same(value, default[key], f"{where}.{key}")
        else:
            assert (list(default) if isinstance(default, (list, tuple)) else default) == shown, where

    for section, values in tree.items():
        same(values, defaults[section], section)
    shown_keys = sum(len(v) for v in tree.values())
    assert shown_keys > 50  # the walk saw the example, not an empty block


# Numbers that plain ``<``/``>`` checks let through (NaN, infinity, negative counts, probabilities
# outside [0, 1]) and that used to crash deep inside training with a traceback.
BAD_NUMBERS = [
    ("optim.lr", "nan"), ("optim.lr", "inf"), ("optim.lr", "-inf"), ("optim.lr", "0"),
    ("optim.betas", "[0.9,2]"), ("optim.betas", "[1.0,0.98]"), ("optim.betas", "[-0.1,0.98]"),
    ("optim.betas", "[0.9,nan]"),
    ("optim.eps", "nan"), ("optim.eps", "inf"), ("optim.eps", "0"), ("optim.eps", "-1e-8"),
    ("optim.weight_decay", "nan"), ("optim.weight_decay", "inf"), ("optim.weight_decay", "-0.1"),
    ("optim.grad_clip", "nan"), ("optim.grad_clip", "inf"), ("optim.min_lr_ratio", "nan"),
    ("optim.warmup_steps", "-1"),
    ("train.seed", "-1"), ("train.seed", str(2**32)), ("train.threads", "-1"),
    ("train.log_every", "-1"), ("train.keep_checkpoints", "0"), ("train.max_nonfinite_steps", "-1"),
    ("data.max_duration", "nan"), ("data.max_duration", "inf"), ("data.workers", "-1"),
    ("data.dev_max_utterances", "-5"), ("data.max_bad_fraction", "nan"), ("data.clip_fraction", "1.5"),
    ("features.hop_ms", "inf"), ("features.win_ms", "nan"), ("features.log_floor", "nan"),
    ("features.log_floor", "inf"), ("features.f_min", "-1"),
    ("spec_augment.p", "nan"), ("spec_augment.time_width_ratio", "2"),
    ("tokenizer.seed", "-1"), ("tokenizer.character_coverage", "nan"),
    ("model.ctc_weight", "nan"), ("model.ctc_weight", "inf"), ("model.ctc_weight", "-0.5"),
    ("model.lstm_layer_norm_epsilon", "nan"), ("model.lstm_layer_norm_epsilon", "0"),
    ("model.right_context_length", "-4"), ("model.transformer_left_context_length", "-1"),
    ("model.transformer_max_memory_size", "-1"), ("model.lstm_dropout", "nan"),
    ("batch.bucket_width_s", "inf"), ("batch.seed", "-1"),
]


@pytest.mark.parametrize(("key", "value"), BAD_NUMBERS)
def test_bad_numbers_are_user_errors_naming_the_key(key, value):
    import re

    with pytest.raises(UserError, match=re.escape(key)) as exc:
        load_config(None, [f"{key}={value}"])
    assert "got" in str(exc.value)


@pytest.mark.parametrize(
    "overrides",
    [
        ["optim.lr=1e-9", "optim.betas=[0.0,0.999]", "optim.eps=1e-12", "optim.weight_decay=0",
         "optim.grad_clip=0", "optim.min_lr_ratio=1"],
        ["train.seed=0", f"train.seed={2**32 - 1}", "train.threads=0", "data.workers=0",
         "data.dev_max_utterances=0", "model.ctc_weight=2.5", "model.right_context_length=0",
         "tokenizer.seed=7", "batch.seed=3"],
    ],
)
def test_boundary_numbers_stay_valid(overrides):
    load_config(None, overrides)


@pytest.mark.parametrize(("key", "value"), [("optim.lr", "nan"), ("optim.betas", "[0.9,2]"), ("train.seed", "-1"),
                                            ("train.threads", "-1")])
def test_print_config_rejects_bad_numbers(key, value, tmp_path, capsys):
    from sparse_rnnt.cli import main

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--set", f"{key}={value}", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_validate_checks_configs_built_in_code():
    import dataclasses

    cfg = ExperimentConfig()
    bad = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=float("nan")))
    with pytest.raises(UserError, match=r"optim\.lr"):
        bad.validate()
    with pytest.raises(UserError, match=r"optim\.betas"):
        dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, betas=(0.9,))).validate()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["features.n_mels=40"], r"features\.n_mels \(40\) must equal model\.input_dim \(80\)"),
        (["model.input_dim=40"], r"features\.n_mels \(80\) must equal model\.input_dim \(40\)"),
        (["model.transformer_weight_init_scale_strategy=foo"],
         r"model\.transformer_weight_init_scale_strategy must be depthwise or constant, got 'foo'"),
    ],
)
def test_model_and_features_must_fit_together(overrides, message, tmp_path, capsys):
    # These passed validation and crashed after the data work with a traceback.
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)
    from sparse_rnnt.cli import main

    out = tmp_path / "run"
    for extra in (["--print-config"], ["--set", f"data.manifest_dir={tmp_path}"]):
        assert main(["train", "--out", str(out), *[a for o in overrides for a in ("--set", o)], *extra]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not out.exists()


def test_matching_feature_and_model_sizes_and_init_strategies_stay_valid():
    cfg = load_config(None, ["features.n_mels=40", "model.input_dim=40"])
    assert cfg.features.n_mels == cfg.model.input_dim == 40
    load_config(None, ["model.transformer_weight_init_scale_strategy=constant"])
