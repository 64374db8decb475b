import pytest

from dreambooth_dora.training.config import ConfigError, TrainConfig, load_config, parse_flags


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
    (["--rank", "four"], "rank must be a whole number"),
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


DIFFUSERS_FLAGS = """pretrained_model_name_or_path revision variant instance_data_dir instance_prompt dataset_name
image_column caption_column with_prior_preservation class_data_dir class_prompt num_class_images sample_batch_size
prior_generation_precision repeats prior_loss_weight output_dir seed resolution center_crop random_flip
train_text_encoder train_batch_size max_train_steps num_train_epochs gradient_accumulation_steps
gradient_checkpointing learning_rate text_encoder_lr lr_scheduler lr_warmup_steps use_8bit_adam optimizer
mixed_precision allow_tf32 rank lora_alpha lora_dropout use_dora snr_gamma noise_offset cache_latents
checkpointing_steps checkpoints_total_limit resume_from_checkpoint validation_prompt num_validation_images
validation_steps report_to logging_dir""".split()


def test_diffusers_flag_names_are_settings_and_documented():
    from dreambooth_dora.training.config import describe_fields, help_text

    names = {f[0] for f in describe_fields()}
    assert set(DIFFUSERS_FLAGS) <= names
    assert all(f"--{n} " in help_text() for n in DIFFUSERS_FLAGS)


def test_a_diffusers_command_line_works_unchanged(icon_dir, tmp_path):
    argv = f"""--pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 --instance_data_dir {icon_dir}
    --output_dir {tmp_path} --instance_prompt |a photo of sks dog| --resolution 512 --train_batch_size 1
    --gradient_accumulation_steps 1 --checkpointing_steps 100 --learning_rate 1e-4 --report_to tensorboard
    --lr_scheduler constant --lr_warmup_steps 0 --max_train_steps 500 --validation_prompt |A photo of sks dog, in a bucket|
    --seed 0 --mixed_precision fp16 --use_dora --train_text_encoder --with_prior_preservation
    --class_data_dir {tmp_path}/class --class_prompt |a photo of dog| --num_class_images 50""".split("|")
    args = [a for i, part in enumerate(argv) for a in ([part] if i % 2 else part.split())]
    cfg = load_config(args)
    assert cfg.validation_prompt == ["A photo of sks dog, in a bucket"]  # commas stay inside one prompt
    assert cfg.use_dora and cfg.train_text_encoder and cfg.with_prior_preservation and cfg.num_class_images == 50
    assert load_config([*args, "--validation_prompt", "a|b"]).validation_prompt == ["a", "b"]


@pytest.mark.parametrize("yaml_text, message", [
    ("rank: 4.7\n", "rank must be a whole number, got 4.7"),
    ("rank: true\n", "rank must be a whole number, got True"),
    ("learning_rate: .nan\n", "learning_rate must be a finite number"),
    ("learning_rate: .inf\n", "learning_rate must be a finite number"),
    ("learning_rate: -1e-4\n", "learning_rate must be > 0"),
    ("text_encoder_lr: 0\n", "text_encoder_lr must be > 0"),
    ("adam_beta1: 1.0\n", r"adam_beta1 must be in \[0, 1\)"),
    ("adam_beta2: -0.1\n", r"adam_beta2 must be in \[0, 1\)"),
    ("adam_epsilon: 0\n", "adam_epsilon must be > 0"),
    ("adam_weight_decay: -1\n", "adam_weight_decay must be >= 0"),
    ("seed: -1\n", r"seed must be in \[0, 4294967295\], got -1"),
    ("seed: 1000000000000000000000\n", r"seed must be in \[0, 4294967295\]"),
    ("max_sequence_length: 100000\n", "max_sequence_length must be <= 512"),
    ("logging_dir: /tmp/logs\n", "logging_dir '/tmp/logs' must be a folder inside output_dir"),
    ("logging_dir: ../../logs\n", "logging_dir '../../logs' must be a folder inside output_dir"),
    ("lr_warmup_steps: -5\n", "lr_warmup_steps must be >= 0"),
    ("lora_alpha: 0\n", "lora_alpha must be > 0"),
    ("max_grad_norm: .nan\n", "max_grad_norm must be a finite number"),
    ("prior_loss_weight: -1\n", "prior_loss_weight must be >= 0"),
    ("snr_gamma: 0\n", "snr_gamma must be > 0"),
    ("instance_prompt: [a, b]\n", "instance_prompt must be a text value"),
    ("learning_rate: fast\n", "learning_rate must be a number, got 'fast'"),
    ("unet_target_modules: {to_q: 1}\n", "unet_target_modules must be a list"),
    ("pretrained_model_name_or_path: 'embedded:toy-wrld'\n",
     "unknown embedded model 'toy-wrld'; known: 'embedded:toy-world', 'embedded:toy-world-flux', 'embedded:tiny-random'"),
])
def test_every_setting_is_checked_for_type_and_range(tmp_path, icon_dir, yaml_text, message):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"instance_data_dir: {icon_dir}\n" + yaml_text.replace("instance_prompt: [a, b]\n", "")
                        + ("instance_prompt: [a, b]\n" if "instance_prompt" in yaml_text else "instance_prompt: x\n"))
    with pytest.raises(ConfigError, match=message):
        load_config(["--config", str(cfg_file)])


@pytest.mark.parametrize("text, message", [
    ("rank: [4\n", "not valid YAML at line 2, column 1: expected ',' or ']'"),
    ("a: 1\nb: 2\nrank: : 4\n", "not valid YAML at line 3, column 7: mapping values are not allowed here"),
    ("rank: 4\n\tlr: 1\n", "not valid YAML at line 2, column 1: found character '\\\\t'"),
])
def test_invalid_yaml_names_line_and_column(tmp_path, text, message):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(["--config", str(cfg_file)])


def test_integral_floats_and_flag_strings_are_integers(base_args):
    cfg = load_config([*base_args, "--rank", "8", "--seed", "0", "--num_class_images", "3"])
    assert cfg.rank == 8 and isinstance(cfg.rank, int)
    with pytest.raises(ConfigError, match="rank must be a whole number, got '4.7'"):
        load_config([*base_args, "--rank", "4.7"])


def test_yaml_that_is_not_utf8_and_output_dirs_that_cannot_be(tmp_path, base_args):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("instance_prompt: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(["--config", str(bad)])
    a_file = tmp_path / "f"
    a_file.write_text("x")
    from dreambooth_dora.training.runs import check_output_dir

    for out, message in [(a_file, "is a file"), (a_file / "sub", "cannot be created"), (".", "current folder"),
                         ("/", "file-system root")]:
        with pytest.raises(ConfigError, match=message):
            check_output_dir(load_config([*base_args, "--output_dir", str(out)]))
    try:  # a read-only place (root ignores permission bits, so use a read-only mount when there is one)
        probe = "/sys/dreambooth-dora-probe"
        import os

        os.mkdir(probe)
        os.rmdir(probe)
    except OSError:
        with pytest.raises(ConfigError, match="cannot be written"):
            check_output_dir(load_config([*base_args, "--output_dir", "/sys/dreambooth_dora_run"]))
