"""`dreambooth-dora study`: the grid, resumability after a kill, the bootstrap intervals against
scipy's, learning-rate choice on held-out seeds, the paired difference and the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dreambooth_dora.config import ConfigError
from dreambooth_dora.evaluation import study
from dreambooth_dora.evaluation.study import bootstrap_ci, load_study_config, matched_rank

REPO = Path(__file__).resolve().parents[1]


def test_bootstrap_interval_agrees_with_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    values = [0.61, 0.55, 0.70, 0.58, 0.66]
    mean, lo, hi = bootstrap_ci(values, resamples=20000, seed=1)
    ref = scipy_stats.bootstrap((np.array(values),), np.mean, n_resamples=20000, method="percentile",
                                confidence_level=0.95, rng=np.random.default_rng(2)).confidence_interval
    assert mean == pytest.approx(np.mean(values)) and lo < mean < hi
    assert abs(lo - ref.low) < 0.006 and abs(hi - ref.high) < 0.006  # two Monte Carlo estimates of one interval
    assert bootstrap_ci([0.3, 0.3, 0.3]) == (0.3, 0.3, 0.3)  # no spread, no interval


def test_matched_rank_is_the_nearest_parameter_count():
    # 10 layers of 64 -> 64: LoRA r has r * 1280 parameters, DoRA r has r * 1280 + 640
    assert matched_rank(4, 4 * 1280 + 640, lambda r: r * 1280) == 4  # 4.5 ties: the lower rank
    assert matched_rank(4, 4 * 1280 + 700, lambda r: r * 1280) == 5


def cfg_for(tmp_path, *extra):
    return load_study_config(["--base_model", "embedded:toy-world", "--instance_data_dir",
                              str(REPO / "sample_data" / "3d_icon"), "--methods", "dora,lora", "--ranks", "2",
                              "--learning_rates", "1e-3", "--training_seeds", "0", "--max_train_steps", "4",
                              "--checkpointing_steps", "2", "--train_args", "--resolution,32", "--long_steps", "none",
                              "--subject_prompts", "a sks icon, 3d render", "--class_prompts", "a orange square icon",
                              "--unrelated_prompts", "a red ball", "--selection_seeds", "0", "--report_seeds", "1",
                              "--num_inference_steps", "2", "--bootstrap", "200", "--output_dir",
                              str(tmp_path / "study"), *extra])


def test_settings_are_checked(tmp_path):
    for extra, message in [(["--methods", "dora,qlora"], "qlora"), (["--report_seeds", "0"], "disjoint"),
                           (["--learning_rates", "0"], "finite and > 0"), (["--ranks", ""], "ranks is empty")]:
        with pytest.raises(ConfigError, match=message):
            cfg_for(tmp_path, *extra)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_killed_study_resumes_without_redoing_finished_cells(tmp_path, monkeypatch):
    import dreambooth_dora.train as train_module
    from conftest import interrupt_at

    trained = []
    real = study.train_cell

    def counting(cfg, cell, out):
        trained.append(cell.id)
        return real(cfg, cell, out)

    monkeypatch.setattr(study, "train_cell", counting)
    interrupt_at(monkeypatch, train_module, 4 + 3)  # during the second cell's third step (after its checkpoint)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(cfg_for(tmp_path), progress=False)
    record = json.loads((tmp_path / "study" / "study.json").read_text())
    assert list(record["done"]) == ["dora-r2-lr0.001-s0"] and trained == ["dora-r2-lr0.001-s0", "lora-r2-lr0.001-s0"]
    with pytest.raises(ConfigError, match="add --resume"):
        study.run_study(cfg_for(tmp_path), progress=False)  # a study folder is never overwritten
    monkeypatch.undo()
    monkeypatch.setattr(study, "train_cell", counting)
    trained.clear()
    report = study.run_study(cfg_for(tmp_path, "--resume"), progress=False)
    assert trained == ["lora-r2-lr0.001-s0"]  # the finished cell was not run again
    lora_run = tmp_path / "study" / "runs" / "lora-r2-lr0.001-s0"
    assert len(json.loads((lora_run / "run.json").read_text())["sessions"]) == 2  # resumed, not restarted
    text = report.read_text()
    assert "| dora | 2 | 0.001 | 1 |" in text and "| lora | 2 | 0.001 | 1 |" in text
    assert "weight slope dM/dD" in text
    weights = json.loads((tmp_path / "study" / "cells" / "lora-r2-lr0.001-s0.json").read_text())["weights"]
    assert weights["r"] > 0.5 and weights["mean_dm"] > 0  # LoRA's magnitude follows its direction
    assert "cannot be told at rank 2: 1 training seed(s)" in text  # one training seed: no interval
    for name in ("metric_vs_lr.png", "metric_vs_step.png", "summary.json"):
        assert (tmp_path / "study" / name).is_file()
    cells = json.loads((tmp_path / "study" / "cells" / "dora-r2-lr0.001-s0.json").read_text())["metrics"]
    assert sorted(map(int, cells)) == [2, 4] and "toy-I" in cells["4"]  # every snapshot evaluated
    with pytest.raises(ConfigError, match="other settings"):
        study.run_study(cfg_for(tmp_path, "--resume", "--max_train_steps", "6"), progress=False)


def test_best_rate_is_chosen_on_selection_seeds_only(tmp_path):
    cfg = load_study_config(["--instance_data_dir", str(REPO / "sample_data" / "3d_icon"), "--learning_rates",
                             "1e-4,1e-3", "--training_seeds", "0,1,2", "--methods", "dora,lora", "--output_dir",
                             str(tmp_path / "s")])
    cells = study.plan(cfg)
    # DoRA: 1e-3 wins on the selection seeds but loses on the report seeds; LoRA the other way round
    results = {}
    for c in cells:
        good = (c.lr == 1e-3) == (c.method == "dora")
        report = (0.4 if c.method == "dora" else 0.8) if good else 0.1
        results[c.id] = {200: {"toy-I": {"selection": 0.9 if good else 0.5, "report": report},
                               "class toy dist": {"selection": 0.1, "report": 0.1}}}
    best = study.best_rates(cfg, cells, results)
    assert best[("dora", 4)] == 1e-3 and best[("lora", 4)] == 1e-4
    s = study.summary(cfg, cells, results)
    rows = {r["method"]: r for r in s["rows"]}
    assert rows["dora"]["metric"][0] == pytest.approx(0.4) and rows["lora"]["metric"][0] == pytest.approx(0.8)
    assert s["pairs"][0]["diff"][0] == pytest.approx(-0.4) and s["pairs"][0]["distinguishable"]


def test_matched_rank_counts_the_real_adapters(tmp_path):
    """lora-matched's rank from the layer shapes equals counting the parameters of real adapters."""
    from dreambooth_dora.adapters import adapter_parameters, add_adapters
    from dreambooth_dora.config import UNET_ATTENTION_TARGETS
    from dreambooth_dora.models import load_components, resolve_model

    cfg = load_study_config(["--instance_data_dir", str(REPO / "sample_data" / "3d_icon"), "--methods",
                             "dora,lora-matched", "--ranks", "1,4", "--output_dir", str(tmp_path / "s")])

    def count(rank, dora):
        unet = load_components(resolve_model(cfg.base_model))[3]
        add_adapters(unet, list(UNET_ATTENTION_TARGETS), rank=rank, alpha=rank, use_dora=dora)
        return sum(p.numel() for p in adapter_parameters(unet))

    for rank in (1, 4):
        target = count(rank, True)
        expected = min(range(1, 4 * rank + 2), key=lambda r: (abs(count(r, False) - target), r))
        cell = next(c for c in study.plan(cfg) if c.method == "lora-matched" and c.rank == rank)
        assert cell.train_rank == expected
