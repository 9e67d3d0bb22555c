"""Config loading: sections, overrides, and one-line errors that name the key, the value and what is allowed."""
import pytest
import yaml

from clove_dist.config import Config, ConfigError, load_config, from_dict, packaged_config, save_config
from clove_dist.model import _check_pretrained


def test_defaults_are_the_paper_recipe():
    cfg = load_config(packaged_config("clove_vit_b32"))
    # OpenAI's weights were trained with QuickGELU: the architecture must build it (plain ViT-B-32 builds GELU)
    assert cfg.model.name == "ViT-B-32-quickgelu" and cfg.model.pretrained == "openai"
    _check_pretrained(cfg.model.pretrained, cfg.model.name)  # no activation mismatch
    assert cfg.optim.lr == 1e-6 and cfg.optim.warmup_steps == 2000 and cfg.optim.schedule == "cosine"
    assert cfg.optim.weight_decay == 0.1 and cfg.data.batch_size == 256
    assert cfg.train.total_samples == 1_000_000_000 and cfg.patching.alphas == (0.6,)
    assert cfg.data.caption_key == "json.top_caption" and cfg.negatives.style == "replace"


@pytest.mark.parametrize("name", ["debug", "demo", "clove_vit_b32"])
def test_shipped_configs_load(name):
    assert isinstance(load_config(packaged_config(name)), Config)


def test_overrides_are_typed():
    cfg = from_dict({}, ["optim.lr=1e-5", "data.batch_size=8", "data.resampled=false", "patching.alphas=[0, 0.5]",
                         "model.name=clove-tiny"])
    assert cfg.optim.lr == 1e-5 and cfg.data.batch_size == 8 and cfg.data.resampled is False
    assert cfg.patching.alphas == (0.0, 0.5) and cfg.model.name == "clove-tiny"
    assert from_dict({}).loss.deterministic is False  # the fused backward by default
    assert from_dict({}, ["loss.deterministic=true"]).loss.deterministic is True


@pytest.mark.parametrize("raw,overrides,needle", [
    ({"optim": {"lrr": 1}}, [], "unknown config key 'optim.lrr' (did you mean 'lr'?)"),
    ({"optimm": {}}, [], "unknown config section 'optimm' (did you mean 'optim'?)"),
    ({}, ["optim.lr=abc"], "optim.lr: expected a number, got 'abc'"),
    ({}, ["data.batch_size=0"], "data.batch_size: 0 must be > 0"),
    ({}, ["loss.impl=cuda"], "loss.impl: 'cuda' is not one of auto, triton, chunked, reference"),
    ({}, ["distributed.zero_stage=4"], "distributed.zero_stage: 4 is not one of 0, 1, 2, 3"),
    ({}, ["patching.alphas=[1.5]"], "patching.alphas: 1.5 must be in [0, 1]"),
    ({}, ["optim=1"], "must be section.key"),
    ({}, ["data.resampled=maybe"], "data.resampled: expected true or false, got 'maybe'"),
    ({"loss": {"deterministic": "sometimes"}}, [], "loss.deterministic: expected true or false, got 'sometimes'"),
    ({"data": [1, 2]}, [], "data: expected a mapping"),
])
def test_user_mistakes_name_the_key(raw, overrides, needle):
    with pytest.raises(ConfigError) as e:
        from_dict(raw, overrides)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(lst)


def test_resolved_config_round_trips(tmp_path):
    cfg = from_dict({"optim": {"lr": 3e-4}}, ["patching.alphas=[0.2,0.8]"])
    save_config(cfg, tmp_path / "config.yaml")
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert raw["optim"]["lr"] == 3e-4 and raw["run"]["seed"] == 0
    assert load_config(tmp_path / "config.yaml") == cfg


def test_activation_mismatch_is_one_line():
    from clove_dist.model import ModelError, _check_pretrained
    with pytest.raises(ModelError, match="trained with QuickGELU but ViT-B-32 builds GELU; use model.name: "
                                         "ViT-B-32-quickgelu"):
        _check_pretrained("openai", "ViT-B-32")
    _check_pretrained("laion2b_s34b_b79k", "ViT-B-32")  # GELU weights in a GELU architecture are fine
