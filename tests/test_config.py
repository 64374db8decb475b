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
    from dreambooth_dora.config import describe_fields, help_text

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
