import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dreambooth_dora import adapter_state_dict, add_adapters, load_adapter_state_dict
from dreambooth_dora.config import load_config
from dreambooth_dora.train import load_models, train

REPO = Path(__file__).resolve().parents[1]


def test_quick_training_saves_an_adapter_that_changes_the_model(tiny_sd_path, icon_dir, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(["--pretrained_model_name_or_path", str(tiny_sd_path), "--instance_data_dir", str(icon_dir),
                       "--instance_prompt", "a sks icon", "--resolution", "64", "--max_train_steps", "4",
                       "--learning_rate", "1e-2", "--train_text_encoder", "--output_dir", str(out),
                       "--report_to", "none"])
    path = train(cfg)
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    assert any(k.startswith("unet.") and k.endswith("attn2.to_k.lora_magnitude_vector") for k in keys)
    assert any(k.startswith("text_encoder.") and k.endswith("q_proj.lora_A.weight") for k in keys)
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.use_dora"] is True
    assert json.loads(meta["dreambooth_dora"])["steps"] == 4
    # training moved B off zero, so the adapted UNet differs from the base
    assert any(v.abs().max() > 0 for k, v in tensors.items() if k.endswith("lora_B.weight"))
    _, _, _, unet, _ = load_models(str(tiny_sd_path))
    x, t, cond = torch.randn(1, 4, 32, 32), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        before = unet(x, t, cond).sample
        add_adapters(unet, cfg.unet_target_modules, rank=4)
        unet_sd = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
        load_adapter_state_dict(unet, unet_sd)
        after = unet(x, t, cond).sample
    assert (after - before).abs().max() > 1e-4
    assert adapter_state_dict(unet).keys() == unet_sd.keys()


def test_cli_reports_bad_input_in_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "train_dreambooth_dora.py"), "--instance_data_dir", str(empty),
                           "--instance_prompt", "x", "--pretrained_model_name_or_path", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "holds no images" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "dreambooth_dora.cli", "train", "--rnak", "3"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: unknown setting 'rnak'; did you mean rank?"


def test_cli_reports_a_model_that_does_not_load(tmp_path, icon_dir):
    proc = subprocess.run([sys.executable, str(REPO / "train_dreambooth_dora.py"), "--instance_data_dir", str(icon_dir),
                           "--instance_prompt", "x", "--pretrained_model_name_or_path", str(tmp_path / "no-model")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot load model") and "Traceback" not in proc.stderr
