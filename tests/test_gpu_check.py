"""benchmarks/gpu_check.py must not rot: it runs here (no CUDA) with the CUDA parts reported as
skipped, writes its JSON and markdown, and fails when a correctness test fails."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def check(out: Path, *extra):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the CPU-only report")
def test_the_gpu_check_runs_without_a_gpu_and_says_what_it_skipped(tmp_path, capsys):
    # the layers-vs-PEFT cases only: the whole file runs in the suite itself; here the plumbing is
    # checked, in this process (its tests still run in a pytest of their own)
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(["--out", str(tmp_path / "report"), "--repeats", "1",
                        "--tests", "tests/test_cuda.py::test_layers_match_peft_under_autocast"])
    said = capsys.readouterr()
    assert code == 0, said.err[-2000:]
    report = json.loads((tmp_path / "report" / "gpu_check.json").read_text())
    tests = report["tests"]["summary"]
    assert tests["cpu"]["passed"] >= 12 and tests["cpu"]["failed"] == 0
    assert tests["cuda"]["passed"] == 0 and tests["cuda"]["skipped"] >= 12  # reported, not silently passed
    assert report["cuda"] == "skipped" and report["ok"] is None and report["cpu_variants_ok"]  # no GPU pass claimed
    assert report["gpu_figures"].startswith("no GPU figure was produced")
    assert "NOTE: no GPU figure was produced" in said.out
    assert {c["precision"] for c in report["tests"]["cases"]} == {"fp32", "fp16", "bf16"}
    row = report["train_step"][0]
    assert row["saved_dora_over_lora"] > 1 and row["dora_over_lora"] > 0 and "peak_bytes" not in row
    assert len(report["layers"]) == 2 and all(r["peft_over_ours_dora"] > 0 for r in report["layers"])
    dits = [r for r in report["train_step"] if r["model"].startswith(("FLUX.1", "SD 3.5"))]  # the DiT code path runs
    assert [r["model"] for r in dits] == ["FLUX.1 (quick)", "FLUX.1 (quick)", "SD 3.5 medium (quick)"]
    assert dits[1]["note"] == "gradient checkpointing" and all(r["saved_peft_over_ours_dora"] > 0 for r in dits)
    md = (tmp_path / "report" / "gpu_check.md").read_text()
    assert "| CUDA | 0 | 0 |" in md and "Skipped (reported, not passed): " in md and "no CUDA device" in md
    assert "No GPU figure was produced" in md and "TF32 off" in md and "| CPU | bf16 |" in md
    # an existing report is not replaced
    before = sorted((tmp_path / "report").iterdir())
    assert module.main(["--out", str(tmp_path / "report")]) == 2 and sorted((tmp_path / "report").iterdir()) == before


def test_a_failing_correctness_test_fails_the_check(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text("import pytest\n\n\n@pytest.mark.cuda\ndef test_wrong():\n    assert 1 == 2\n")
    proc = check(tmp_path / "report", "--no-timing", "--tests", str(bad))
    assert proc.returncode == 1
    report = json.loads((tmp_path / "report" / "gpu_check.json").read_text())
    assert not report["ok"] and "FAILED: test_wrong" in (tmp_path / "report" / "gpu_check.md").read_text()


def test_a_model_that_does_not_fit_still_gives_a_report_row(monkeypatch):
    """Out of memory at any stage (here: while the variants are built) is a row saying where, and
    the frozen weights are cast before they move (no fp32 copy on the device)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    moved = []
    real_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device) and args[0].type == "meta":
            moved.append({p.dtype for p in self.parameters() if not p.requires_grad})
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    row = gpu_check.train_step_bench("small", lambda: gpu_check.sd15_unet("quick"), torch.device("meta"),
                                     torch.bfloat16, repeats=1)
    assert row["model"] == "small" and row["skipped"].startswith(
        "out of memory at building the three variants (cast, then moved to the device)")
    assert moved == [{torch.bfloat16}]  # cast on the host first


@pytest.mark.parametrize("factory", ["flux", "flux-checkpointing", "sd35", "klein", "chroma", "z_image"])
def test_full_size_dit_steps_fit_their_inputs(factory):
    """The full-size DiT rows (which only a GPU runs): FLUX.1's real widths with fewer blocks at
    1024 px, SD 3.5 medium whole; built and run on the meta device (shapes, no memory, no time)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    check_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check_module)
    make = {"flux": lambda: check_module.flux_transformer("full", False),
            "flux-checkpointing": lambda: check_module.flux_transformer("full", True),
            "sd35": lambda: check_module.sd35_transformer("full"),
            "klein": lambda: check_module.klein_transformer("full"),
            "chroma": lambda: check_module.chroma_transformer("full"),
            "z_image": lambda: check_module.z_image_transformer("full")}[factory]
    with torch.device("meta"):
        model, px, inputs, targets, note = make()
        from dreambooth_dora.adapters.inject import _matches

        adapted = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _matches(n, targets)]
        batch = inputs(model, torch.device("meta"), torch.float32)
        out = batch(model, batch.latents)
    assert px == 1024 and out.shape == batch.latents.shape
    assert len(adapted) == {"flux": 2 * 12 + 4 * 3, "flux-checkpointing": 2 * 12 + 4 * 3, "sd35": 24 * 8 - 1,
                            "klein": 2 * 4 + 4 * 2, "chroma": 2 * 12 + 4 * 3, "z_image": (2 + 2 + 6) * 4}[factory]
    tokens = batch.latents.shape[1] if factory.startswith(("flux", "klein", "chroma")) else (px // 16) ** 2
    assert tokens == 4096 and ("gradient checkpointing" in note) == factory.endswith("checkpointing")
