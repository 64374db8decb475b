import pytest

from dreambooth_dora.config import ConfigError, TrainConfig, load_config, parse_flags


@pytest.fixture
def base_args(icon_dir):
    return ["--instance_data_dir", str(icon_dir), "--instance_prompt", "a sks icon"]


def test_flags_override_yaml_and_bools_work_bare_or_with_value(tmp_path, base_args):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("rank: 8\nuse_dora: true\nlearning_rate: 1e-4\nunet_target_modules: [to_q, to_v]\n")
    cfg = load_config(["--config", str(cfg_file), *base_args, "--rank", "16", "--use_dora", "false"])
    assert (cfg.rank, cfg.use_dora, cfg.learning_rate) == (16, False, 1e-4)
    assert cfg.unet_target_modules == ["to_q", "to_v"]
    cfg = load_config([*base_args, "--train_text_encoder", "--center_crop", "--rank=2"])
    assert cfg.train_text_encoder and cfg.center_crop and cfg.rank == 2
    assert parse_flags(["--use_dora"]) == {"use_dora": "true"}
    assert load_config([*base_args, "--unet_target_modules", "to_q,to_k"]).unet_target_modules == ["to_q", "to_k"]


@pytest.mark.parametrize("argv, message", [
    (["--rnak", "4"], "did you mean rank"),
    (["--use_dora", "maybe"], "use_dora must be true or false"),
    (["--rank", "four"], "rank must be a int"),
    (["--rank", "0"], "rank must be >= 1"),
    (["--resolution", "100"], "multiple of 8"),
    (["--learning_rate"], "--learning_rate needs a value"),
    (["stray"], "unexpected argument"),
])
def test_bad_settings_give_one_clear_error(argv, message, base_args):
    with pytest.raises(ConfigError, match=message):
        load_config([*base_args, *argv])


def test_missing_data_and_prompt_are_reported(tmp_path, icon_dir):
    with pytest.raises(ConfigError, match="give exactly one of instance_data_dir"):
        load_config(["--instance_prompt", "x"])
    with pytest.raises(ConfigError, match="is not a folder"):
        load_config(["--instance_prompt", "x", "--instance_data_dir", str(tmp_path / "nope")])
    with pytest.raises(ConfigError, match="instance_prompt is not set"):
        load_config(["--instance_data_dir", str(icon_dir)])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("lerning_rate: 1\n")
    with pytest.raises(ConfigError, match="did you mean learning_rate"):
        load_config(["--config", str(bad_yaml)])
    assert TrainConfig().use_dora is True  # DoRA by default
