"""Every export format merged by every consumer rule: exact where the file says so (checked against
rules written here from the consumers' code, independently of dreambooth_dora.formats.consumers), wrong
where it says so; `info` on every format; what a webui reads; `verify`'s table."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth_dora.adapters.file import apply_to_models, read_adapter
from dreambooth_dora.adapters.inject import adapted_layers
from dreambooth_dora.cli import main
from dreambooth_dora.formats.consumers import RULE_NAMES, RULES, merge, read_kohya_modules
from dreambooth_dora.formats.export import export_full, export_fused, export_kohya, export_svd_lora
from dreambooth_dora.formats.info import file_info
from dreambooth_dora.families import family_of_pipeline, pipeline_models
from dreambooth_dora.families.models import load_pipeline

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def conv_dora(tiny_sd_path, tmp_path_factory):
    """DoRA on attention Linear layers AND 3x3 / 1x1 convolutions, UNet and text encoder."""
    from accelerate.state import AcceleratorState, GradientState

    from dreambooth_dora.training.config import load_config
    from dreambooth_dora.training.loop import train

    out = tmp_path_factory.mktemp("exports") / "conv_dora"
    train(load_config(["--pretrained_model_name_or_path", str(tiny_sd_path), "--instance_data_dir",
                       str(REPO / "sample_data" / "3d_icon"), "--instance_prompt", "a sks icon", "--resolution", "64",
                       "--learning_rate", "5e-2", "--max_train_steps", "3", "--rank", "4", "--lora_alpha", "8",
                       "--unet_target_modules", "to_q,to_v,proj_in,conv1", "--train_text_encoder",
                       "--output_dir", str(out), "--report_to", "none", "--checkpointing_steps", "100"]))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return out


def truths(adapter_dir):
    """{kohya name: (W0, W')} from our exact layers (the fused export's weights, tested elsewhere)."""
    pipe = load_pipeline(read_adapter(adapter_dir).info.base_model)
    models = pipeline_models(pipe)
    apply_to_models(read_adapter(adapter_dir), models)
    return {family_of_pipeline(pipe).kohya_key(p, ("text_model." if p != "unet" and not hasattr(m, "text_model") else "") + n):
            (layer.weight.detach().float(), layer.merged_weight().float())
            for p, m in models.items() for n, layer in adapted_layers(m)}


# ---- the consumers' rules, written here from their code (not from dreambooth_dora.formats.consumers) ----

def v_of(w0, mod):
    return w0 + mod["alpha"] / mod["down"].shape[0] * (mod["up"].flatten(1) @ mod["down"].flatten(1)).reshape(w0.shape)


def lycoris_ref(w0, mod):  # lycoris/modules/locon.py apply_weight_decompose, wd_on_out=True
    v = v_of(w0, mod)
    n = v.reshape(v.shape[0], -1).norm(dim=1).reshape(mod["dora_scale"].shape) + torch.finfo(torch.float32).eps
    return v * mod["dora_scale"] / n


def comfyui_ref(w0, mod):  # comfy weight_decompose, output-axis branch: the norm of the base weight
    v = v_of(w0, mod)
    n = w0.reshape(w0.shape[0], -1).norm(dim=1, keepdim=True).reshape(mod["dora_scale"].shape)
    return v * (mod["dora_scale"] / (n + torch.finfo(torch.float32).eps))


def a1111_ref(w0, mod):  # network.py apply_weight_decompose: transpose(0, 1), norm per input column
    v = v_of(w0, mod)
    n = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1, keepdim=True)
    n = n.reshape(v.shape[1], *[1] * (v.dim() - 1)).transpose(0, 1)  # dora_norm_dims = dim - 1
    return v * (mod["dora_scale"] / n)


REFERENCES = {"lycoris": lycoris_ref, "comfyui-15458": lycoris_ref, "comfyui": comfyui_ref, "a1111": a1111_ref}


def file_modules(path):
    tensors = {k: v.float() for k, v in load_file(str(path)).items()}
    mods = {}
    for k, v in tensors.items():
        name, _, kind = k.partition(".")
        mods.setdefault(name, {})[{"lora_down.weight": "down", "lora_up.weight": "up"}.get(kind, kind)] = v
    for m in mods.values():
        if "alpha" in m:
            m["alpha"] = float(m["alpha"])
    return mods


def rel(a, w0, target):
    return ((a - target).norm() / (target - w0).norm()).item()


@pytest.mark.parametrize("which", ["dora", "conv_dora", "lora"])
def test_each_format_under_each_rule(which, adapters, conv_dora, tmp_path):
    src = conv_dora if which == "conv_dora" else adapters[which]
    truth = truths(src)
    files = {"lycoris-exact": export_kohya(src, tmp_path / "k.safetensors"),
             "full": export_full(src, tmp_path / "full.safetensors")}
    if which != "lora":
        files["comfyui-compensated"] = export_kohya(src, tmp_path / "c.safetensors", comfyui_compatible=True)
    exact_under = {"lycoris-exact": {"lycoris", "comfyui-15458"}, "comfyui-compensated": {"comfyui"},
                   "full": set(RULES)}
    convs = 0
    for kind, path in files.items():
        mods, ours = file_modules(path), read_kohya_modules(load_file(str(path)))
        assert set(mods) == set(truth)  # every adapted layer, nothing else
        for name, (w0, target) in truth.items():
            convs += w0.dim() == 4
            for rule in RULES:
                got = merge(rule, w0, ours[name])
                if kind == "full":
                    ref = w0 + mods[name]["diff"]
                elif "dora_scale" in mods[name]:
                    ref = REFERENCES[rule](w0, mods[name])
                else:
                    ref = v_of(w0, mods[name])
                assert (got - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item()), (kind, rule, name)
                exact = which == "lora" or rule in exact_under[kind]
                if exact:
                    assert rel(got, w0, target) <= 1e-5, (kind, rule, name, rel(got, w0, target))
        if which != "lora" and kind != "full":  # where the file says "wrong", it is measurably wrong
            for rule in set(RULES) - exact_under[kind]:
                worst = max(rel(merge(rule, w0, ours[n]), w0, t) for n, (w0, t) in truth.items())
                assert worst > 1e-3, (kind, rule, worst)
    assert (convs > 0) == (which == "conv_dora")  # the conv fixture really has 3x3 and 1x1 convs


def test_half_precision_exports_state_their_rounding(adapters, tmp_path):
    truth = truths(adapters["dora"])
    bounds = {}
    for fmt, export in (("full", export_full), ("kohya", export_kohya)):
        for dtype in ("fp16", "bf16"):
            path = export(adapters["dora"], tmp_path / f"{fmt}_{dtype}.safetensors", dtype=dtype)
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
                assert {f.get_tensor(k).dtype for k in f.keys() if not k.endswith(".alpha")} == \
                    {torch.float16 if dtype == "fp16" else torch.bfloat16}
            mods = read_kohya_modules(load_file(str(path)))
            worst = max(rel(merge("lycoris", w0, mods[n]), w0, t) for n, (w0, t) in truth.items())
            assert float(meta["dreambooth_dora_dtype_error"]) == pytest.approx(worst, rel=1e-3)
            bounds[(fmt, dtype)] = worst
    # measured on the tiny DoRA adapter: fp16 full ~2e-4, fp16 kohya ~5e-3 of the adapter's own change
    assert bounds[("full", "fp16")] < 1e-3 and bounds[("kohya", "fp16")] < 2e-2
    assert bounds[("full", "bf16")] < 1e-2 and bounds[("full", "fp16")] < bounds[("full", "bf16")]
    fp32 = export_full(adapters["dora"], tmp_path / "f32.safetensors")
    assert fp32.stat().st_size > 1.9 * (tmp_path / "full_fp16.safetensors").stat().st_size


def test_webui_metadata_and_markers(adapters, tiny_sd2_path, tmp_path):
    for method in ("dora", "lora"):
        path = export_kohya(adapters[method], tmp_path / f"{method}.safetensors")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
        assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
        assert meta["ss_output_name"] == method
        assert meta["ss_network_module"] == ("lycoris.kohya" if method == "dora" else "networks.lora")
        assert ("dreambooth_dora_dora_scale" in meta) == (method == "dora")  # the DoRA marker on DoRA files only
        assert meta["dreambooth_dora_rule"] == ("lycoris-exact" if method == "dora" else "lora")
    full = export_full(adapters["dora"], tmp_path / "f.safetensors")
    with safe_open(str(full), "pt") as f:
        meta = f.metadata()
    assert meta["dreambooth_dora_rule"] == "full" and json.loads(meta["ss_network_args"]) == {"algo": "full"}
    assert set(meta["dreambooth_dora_exact_in"].split(",")) == set(RULES)

    # an SD 2.x adapter: ss_v2 so A1111 shows it with an SD 2.x checkpoint loaded
    from accelerate.state import AcceleratorState, GradientState

    from dreambooth_dora.training.config import load_config
    from dreambooth_dora.training.loop import train

    train(load_config(["--pretrained_model_name_or_path", str(tiny_sd2_path), "--instance_data_dir",
                       str(REPO / "sample_data" / "3d_icon"), "--instance_prompt", "a sks icon", "--resolution", "64",
                       "--max_train_steps", "1", "--output_dir", str(tmp_path / "sd2"), "--report_to", "none"]))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert main(["export", str(tmp_path / "sd2"), "--format", "kohya", "--out", str(tmp_path / "SD2.SafeTensors")]) == 0
    with safe_open(str(tmp_path / "SD2.SafeTensors"), "pt") as f:  # the suffix check ignores case
        meta = f.metadata()
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2"
    assert main(["export", str(tmp_path / "sd2"), "--format", "kohya", "--out", str(tmp_path / "SD2.SafeTensors"),
                 "--overwrite"]) == 0  # recognised as our own earlier export whatever the suffix's case


def test_info_describes_every_format(adapters, tmp_path, capsys):
    src = adapters["dora"]
    files = {
        "adapter": src,
        "kohya": export_kohya(src, tmp_path / "k.safetensors"),
        "comfyui": export_kohya(src, tmp_path / "c.safetensors", comfyui_compatible=True),
        "full": export_full(src, tmp_path / "full.safetensors", dtype="fp16"),
        "lora": export_kohya(adapters["lora"], tmp_path / "lora.safetensors"),
        "fused": export_fused(src, tmp_path / "fused"),
    }
    tensors = load_file(str(files["kohya"]))  # a file someone else made: no metadata of ours
    save_file(tensors, str(tmp_path / "foreign.safetensors"))
    files["foreign"] = tmp_path / "foreign.safetensors"
    ours = load_file(str(src / "pytorch_lora_weights.safetensors"))  # a PEFT adapter_model file
    save_file({"base_model.model." + k.split(".", 1)[1]: v for k, v in ours.items() if k.startswith("unet.")},
              str(tmp_path / "adapter_model.safetensors"))
    files["peft"] = tmp_path / "adapter_model.safetensors"
    expect = {
        "adapter": ("diffusers / PEFT adapter", "DoRA", ["diffusers / PEFT"]),
        "kohya": ("output axis (lycoris-exact)", "DoRA", ["LyCORIS / PEFT / diffusers", "ComfyUI after PR #15458"]),
        "comfyui": ("output axis (comfyui-compensated)", "DoRA", ["ComfyUI and Forge today"]),
        "full": ("LyCORIS full", "full difference", []),  # fp16: within its precision (verify: rounding)
        "lora": ("kohya LoRA", "LoRA", ["A1111 (built-in Lora)", "ComfyUI and Forge today",
                                        "ComfyUI after PR #15458", "LyCORIS / PEFT / diffusers"]),
        "fused": ("fused diffusers pipeline", "merged (plain weights)", None),
        "foreign": ("output axis (lycoris-exact)", "DoRA", ["LyCORIS / PEFT / diffusers", "ComfyUI after PR #15458"]),
        "peft": ("PEFT adapter", "DoRA", ["PEFT"]),
    }
    for name, path in files.items():
        assert main(["info", str(path), "--json"]) == 0, name
        d = json.loads(capsys.readouterr().out)
        fmt, method, exact = expect[name]
        assert fmt in d["format"] and d["method"] == method, (name, d["format"], d["method"])
        if exact is not None:
            assert sorted(d["exact_in"]) == sorted(exact), (name, d["exact_in"])
        assert main(["info", str(path)]) == 0
        text = capsys.readouterr().out
        assert "exact in:" in text and len(text) < 3000, name
    assert file_info(files["full"]).dtype == "fp16"
    assert sorted(file_info(files["full"]).rounding_in) == sorted(RULE_NAMES.values())
    save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "sks.safetensors"))  # A1111 embedding
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, str(tmp_path / "xl.safetensors"))
    emb, xl = file_info(tmp_path / "sks.safetensors"), file_info(tmp_path / "xl.safetensors")
    assert emb.format == "textual-inversion embedding" and emb.parts["text_encoder"].modules == 2
    assert set(xl.parts) == {"text_encoder", "text_encoder_2"} and "width 1280" in xl.parts["text_encoder_2"].targets[0]
    assert "does not say which dora_scale" in " ".join(file_info(files["foreign"]).notes)
    assert "A1111 (built-in Lora)" in file_info(files["kohya"]).wrong_in
    assert file_info(files["kohya"]).parts["unet"].ranks[0] == 4


def test_verify_prints_the_table_for_every_format(adapters, conv_dora, tmp_path, capsys):
    src = conv_dora
    files = {"kohya": export_kohya(src, tmp_path / "k.safetensors"),
             "comfyui": export_kohya(src, tmp_path / "c.safetensors", comfyui_compatible=True),
             "full": export_full(src, tmp_path / "f.safetensors"),
             "full16": export_full(src, tmp_path / "f16.safetensors", dtype="fp16"),
             "adapter": src, "fused": export_fused(src, tmp_path / "fused"),
             "svd": export_svd_lora(src, tmp_path / "svd.safetensors", 4)[0]}
    want = {"kohya": ["exact", "WRONG", "exact", "WRONG"], "comfyui": ["WRONG", "exact", "WRONG", "WRONG"],
            "full": ["exact"] * 4, "full16": ["rounding"] * 4, "adapter": ["exact", "WRONG", "exact", "WRONG"],
            "fused": ["exact"] * 4, "svd": ["WRONG"] * 4}  # a DoRA change is full-rank: rank 4 approximates
    n_layers = len(truths(src))
    for name, path in files.items():
        assert main(["verify", str(path), "--against", str(src)]) == 0, name
        out = capsys.readouterr().out
        rows = [r for r in out.splitlines() if r.startswith("| ")]
        header = [c.strip() for c in rows[0].strip("|").split("|")]
        assert header == ["layer", "LyCORIS / PEFT / diffusers", "ComfyUI and Forge today", "ComfyUI after PR #15458",
                          "A1111 (built-in Lora)"]
        assert len([r for r in rows if r.startswith("| lora_")]) == n_layers  # one row per adapted layer
        verdict = [c.strip().split(":")[0] for c in next(r for r in rows if "verdict" in r).strip("|").split("|")][1:]
        assert verdict == want[name], (name, verdict)
    assert main(["verify", str(tmp_path / "nothing"), "--against", str(src)]) == 2
    assert capsys.readouterr().err.startswith("error: no file at")


def test_svd_reextraction_for_uis_without_dora(adapters, tmp_path, capsys):
    """A rank-4 LoRA re-extracted at rank 4 is exact everywhere; a DoRA change is full-rank (the
    magnitudes rescale whole rows), so its re-extraction error falls with the rank and is printed."""
    lora_truth = truths(adapters["lora"])
    path, error = export_svd_lora(adapters["lora"], tmp_path / "l4.safetensors", 4)
    mods = read_kohya_modules(load_file(str(path)))
    for rule in RULES:
        assert max(rel(merge(rule, w0, mods[n]), w0, t) for n, (w0, t) in lora_truth.items()) <= 1e-5
    assert error <= 1e-5
    errors = [export_svd_lora(adapters["dora"], tmp_path / f"d{r}.safetensors", r)[1] for r in (1, 4, 16)]
    assert errors[0] > errors[1] > errors[2] and errors[1] > 1e-3
    info = file_info(tmp_path / "d4.safetensors")
    assert info.method == "LoRA (approximation)" and info.exact_in == [] and info.wrong_in == []
    assert f"{errors[1]:.2e}" in " ".join(info.notes)
    assert main(["export", str(adapters["dora"]), "--format", "kohya-lora", "--rank", "2",
                 "--out", str(tmp_path / "cli.safetensors")]) == 0
    assert "rank-2 re-extraction: max over layers" in capsys.readouterr().out
    assert main(["export", str(adapters["dora"]), "--format", "kohya", "--rank", "2",
                 "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--rank applies to it only" in capsys.readouterr().err


def test_a_kohya_file_where_an_adapter_is_expected_is_one_short_line(adapters, tmp_path, capsys):
    kohya = export_kohya(adapters["dora"], tmp_path / "k.safetensors")
    capsys.readouterr()
    assert main(["export", str(kohya), "--format", "fused", "--out", str(tmp_path / "fused")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err) < 400 and "kohya / LyCORIS file" in err and "dreambooth-dora info" in err



def edited_adapter(src, dst, edit):
    """A copy of the adapter folder `src` at `dst` with its tensors changed by `edit(tensors)`."""
    import shutil

    shutil.copytree(src, dst)
    with safe_open(str(dst / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(dst / "pytorch_lora_weights.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "pytorch_lora_weights.safetensors"), metadata=meta)
    return dst


def verdicts(out: str) -> list[str]:
    row = next(r for r in out.splitlines() if "verdict" in r)
    return [c.strip() for c in row.strip("|").split("|")][1:]


def test_verify_judges_an_unchanged_layer_against_w0_and_nan_as_wrong(adapters, tmp_path, capsys):
    """A layer the adapter leaves as it was (B = 0, magnitude = ||W0|| per row: SDXL's last clip_l
    layer under penultimate-layer conditioning gets exactly this) is not divided by its ~0 change."""
    src = adapters["dora"]
    models = pipeline_models(load_pipeline(read_adapter(src).info.base_model))
    name = next(k for k in read_adapter(src).tensors if k.startswith("unet.") and k.endswith("lora_B.weight"))
    module = name.removeprefix("unet.").removesuffix(".lora_B.weight")
    w0 = models["unet"].get_submodule(module).weight.detach().float()

    def unchanged(t):
        t[name] = torch.zeros_like(t[name])
        t[name.replace("lora_B.weight", "lora_magnitude_vector")] = w0.flatten(1).norm(dim=1)

    still = edited_adapter(src, tmp_path / "still", unchanged)
    kohya = export_kohya(still, tmp_path / "still.safetensors")
    assert main(["verify", str(kohya), "--against", str(still)]) == 0
    out = capsys.readouterr().out
    assert verdicts(out)[0] == "exact" and verdicts(out)[2] == "exact"
    assert "layers the adapter leaves unchanged, judged against ||W0|| instead: 1" in out
    row = next(r for r in out.splitlines() if "(unchanged: vs ‖W0‖)" in r)
    assert float(row.split("|")[2]) < 1e-5  # fp32 rounding of W0, not 1e23
    with safe_open(str(kohya), "pt") as f:
        assert float(f.metadata()["dreambooth_dora_dtype_error"]) < 1e-5

    broken = tmp_path / "nan.safetensors"
    tensors = load_file(str(export_kohya(src, tmp_path / "k.safetensors")))
    up = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[up][0, 0] = float("nan")
    save_file(tensors, str(broken))
    assert main(["verify", str(broken), "--against", str(src)]) == 0
    out = capsys.readouterr().out
    assert verdicts(out) == ["WRONG"] * 4 and "| **max** | nan |" in out


def test_verify_labels_16_bit_files_with_their_measured_rounding(adapters, tmp_path, capsys):
    src = adapters["dora"]
    truth = truths(src)
    for fmt, export in (("kohya", export_kohya), ("full", export_full)):
        for dtype in ("bf16", "fp16"):
            path = export(src, tmp_path / f"{fmt}_{dtype}.safetensors", dtype=dtype)
            assert main(["verify", str(path), "--against", str(src), "--summary"]) == 0
            out = capsys.readouterr().out
            mods = file_modules(path)
            ref = (lambda w0, m: w0 + m["diff"]) if fmt == "full" else lycoris_ref
            worst = max(rel(ref(w0, mods[n]), w0, t) for n, (w0, t) in truth.items())  # measured here
            got = verdicts(out)[0]
            assert got == f"rounding: {100 * worst:.2g}%", (fmt, dtype, got, worst)
            assert f"({dtype})" in out.splitlines()[0]
            advised = "for under 1% export --format full" in out
            assert advised == (worst > 0.01), (fmt, dtype, worst)
            if fmt == "kohya":  # the ComfyUI rule is wrong for this file whatever its precision
                assert verdicts(out)[1] == "WRONG" and verdicts(out)[3] == "WRONG"


def test_each_metadata_field_means_one_thing(adapters, tmp_path):
    """dreambooth_dora_dtype_error is the stored precision's error only; an SVD file's
    approximation error is its own field."""
    path, error = export_svd_lora(adapters["dora"], tmp_path / "svd.safetensors", 2)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert error > 1e-3 and float(meta["dreambooth_dora_svd_error"]) == pytest.approx(error, rel=1e-3)
    assert float(meta["dreambooth_dora_dtype_error"]) < 1e-5  # fp32: no rounding to speak of
    path16 = export_svd_lora(adapters["dora"], tmp_path / "svd16.safetensors", 2, dtype="fp16")[0]
    with safe_open(str(path16), "pt") as f:
        assert 1e-6 < float(f.metadata()["dreambooth_dora_dtype_error"]) < error


def _edited(source: Path, target: Path, change) -> Path:
    """A copy of safetensors file `source` (its metadata kept) with `change(tensors)` applied."""
    with safe_open(str(source), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(source))
    change(tensors)
    save_file(tensors, str(target), metadata=meta)
    return target


def test_info_and_verify_never_disagree(adapters, tmp_path, capsys):
    """Per file and consumer rule, info's verdict (exact / within its precision / wrong) is verify's,
    or info gives none and says to run verify: 16-bit files (their measured loss), fused pipelines,
    a file with NaN, a module whose ranks do not fit, a module re-cut to another rank after export."""
    from dreambooth_dora.formats.verify import verify

    src = adapters["dora"]
    kohya = export_kohya(src, tmp_path / "k32.safetensors")
    up = next(k for k in load_file(str(kohya)) if k.endswith("lora_up.weight"))
    module = up.removesuffix(".lora_up.weight")

    def nan(t):
        t[up][0, 0] = float("nan")

    def misfit(t):
        t[up] = t[up][:, :-1].contiguous()

    def recut(t):
        t[up], t[f"{module}.lora_down.weight"] = t[up][:, :-1].contiguous(), t[f"{module}.lora_down.weight"][:-1].contiguous()

    files = {"kohya32": kohya, "kohya-bf16": export_kohya(src, tmp_path / "kbf.safetensors", dtype="bf16"),
             "comfyui-fp16": export_kohya(src, tmp_path / "c16.safetensors", comfyui_compatible=True, dtype="fp16"),
             "full-fp16": export_full(src, tmp_path / "f16.safetensors", dtype="fp16"),
             "full-bf16": export_full(src, tmp_path / "fbf.safetensors", dtype="bf16"),
             "lora-bf16": export_kohya(adapters["lora"], tmp_path / "l16.safetensors", dtype="bf16"),
             "fused-fp16": export_fused(src, tmp_path / "fused16", dtype="fp16"),
             "nan": _edited(kohya, tmp_path / "nan.safetensors", nan),
             "misfit": _edited(kohya, tmp_path / "misfit.safetensors", misfit),
             "recut": _edited(kohya, tmp_path / "recut.safetensors", recut)}
    silent = set()
    for name, path in files.items():
        against = adapters["lora"] if name.startswith("lora") else src
        report = verify(path, against)
        info = file_info(path)
        for rule in RULES:
            said = verify_class = report.verdict(rule).split(":")[0]
            consumer = RULE_NAMES[rule]
            mine = ("exact" if consumer in info.exact_in else "rounding" if consumer in info.rounding_in
                    else "WRONG" if consumer in info.wrong_in else None)
            if mine is None:
                silent.add(name)
                assert "verify" in " ".join(info.notes), (name, rule)
            else:
                assert mine == verify_class, (name, rule, mine, said, info.notes)
    assert silent == {"recut"}  # 16-bit files carry their measured loss; only a changed file has no verdict
    for name in ("nan", "misfit"):
        assert file_info(files[name]).notes[0].startswith("BROKEN"), name
    assert main(["info", str(files["nan"])]) == 0
    out = capsys.readouterr().out
    assert "NaN or inf" in out and "exact in: none known" in out


def test_a_nan_adapter_is_refused_by_exports_and_compare_and_flagged_by_info(adapters, tiny_sd_path, tmp_path,
                                                                           capsys):
    from app.core import AppError, Comparison

    broken = tmp_path / "diverged"
    shutil.copytree(adapters["dora"], broken)
    adapter = broken / "pytorch_lora_weights.safetensors"
    _edited(adapter, adapter, lambda t: t[next(k for k in t if k.endswith("lora_B.weight"))].fill_(float("inf")))
    for fmt in ("kohya", "full", "fused"):
        out = tmp_path / (f"x-{fmt}" + ("" if fmt == "fused" else ".safetensors"))
        assert main(["export", str(broken), "--format", fmt, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "NaN or inf in 1 tensor(s)" in err and not out.exists(), err
    comp = Comparison(str(tiny_sd_path), device="cpu")
    with pytest.raises(AppError, match="NaN or inf"):
        comp.load("broken", broken)
    assert list(comp.columns) == ["base"]
    info = file_info(broken)
    assert info.exact_in == [] and info.notes[0].startswith("BROKEN: 1 tensor(s) hold NaN or inf")


def test_export_prints_what_its_precision_costs(adapters, tmp_path, capsys):
    for fmt, dtype, out in (("kohya", "bf16", "k.safetensors"), ("full", "fp16", "f.safetensors"),
                            ("fused", "bf16", "fused"), ("kohya", "fp32", "k32.safetensors")):
        assert main(["export", str(adapters["dora"]), "--format", fmt, "--dtype", dtype,
                     "--out", str(tmp_path / out)]) == 0
        said = capsys.readouterr().out
        line = next((ln for ln in said.splitlines() if ln.startswith(f"{dtype} storage: the merged weights differ")), None)
        assert line is not None, said
        measured = float(line.split(" by ")[1].split("%")[0]) / 100
        if fmt != "fused":
            with safe_open(str(tmp_path / out), "pt") as f:
                assert measured == pytest.approx(float(f.metadata()["dreambooth_dora_dtype_error"]), rel=0.05)
        assert (measured <= 1e-5) == (dtype == "fp32"), (fmt, dtype, measured)


def test_info_names_dit_modules_as_their_checkpoints_do():
    from dreambooth_dora.formats.info import _target

    names = {"lora_unet_single_blocks_3_modulation_lin": "modulation.lin", "lora_unet_img_in": "img_in",
             "lora_unet_final_layer_linear": "final_layer.linear", "lora_unet_double_blocks_0_img_mod_lin": "img_mod.lin",
             "lora_unet_double_blocks_12_img_attn_qkv": "img_attn.qkv", "lora_unet_single_blocks_0_linear1": "linear1",
             "lora_unet_time_in_in_layer": "time_in.in_layer", "lora_unet_joint_blocks_0_x_block_attn_qkv":
             "x_block.attn.qkv", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": "to_q"}
    for key, kind in names.items():
        assert _target(key, "transformer" if "blocks_0_attentions" not in key else "unet") == kind, key
