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
    dumped = to_dict(cfg)
    for section, values in tree.items():  # the values shown survive validation and the round trip
        for key, value in values.items():
            if isinstance(value, dict):
                continue
            got = dumped[section][key]
            assert (list(got) if isinstance(got, (list, tuple)) else got) == value, (section, key)
