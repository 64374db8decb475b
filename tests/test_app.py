"""The comparison app: its functions on the tiny pipeline, its refusals, and the page in a real
browser (Debian's chromium driven by Playwright)."""

import base64
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.core import AppError, Comparison, difference_map, find_adapters, resolve_under_root
from dreambooth_dora.formats.export import export_fused
from dreambooth_dora.toy.tiny import build_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def comp(tiny_sd_path, adapters):
    c = Comparison(str(tiny_sd_path), adapters_root=adapters["dora"].parent, device="cpu")
    c.load("dora", adapters["dora"])
    c.load("lora", adapters["lora"])
    return c


def arr(im):
    return np.asarray(im, dtype=np.int16)


def test_columns_share_seed_and_latents_and_differ_by_adapter(comp):
    first = comp.generate("a sks icon", seed=7, steps=3, num_images=2)
    again = comp.generate("a sks icon", seed=7, steps=3, num_images=2)
    assert set(first) == {"base", "lora", "dora"}
    for col in first:
        assert len(first[col]) == 2 and first[col][0][0].size == (64, 64) and first[col][0][1] > 0
        assert np.array_equal(arr(first[col][0][0]), arr(again[col][0][0]))  # same seed, same pictures
    base, lora, dora = (arr(first[c][0][0]) for c in ("base", "lora", "dora"))
    assert np.abs(base - lora).max() > 0 and np.abs(base - dora).max() > 0 and np.abs(lora - dora).max() > 0
    other = comp.generate("a sks icon", seed=8, steps=3)
    assert np.abs(arr(other["base"][0][0]) - base).max() > 0
    only = comp.generate("a sks icon", seed=7, steps=3, num_images=2, columns=("base",))
    assert set(only) == {"base"} and np.array_equal(arr(only["base"][0][0]), base)  # adapters really off


def test_base_column_is_the_base_model_and_scale_zero_dora_is_not(comp, tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    import torch

    plain = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    plain.set_progress_bar_config(disable=True)
    ours = comp.generate("a sks icon", seed=3, steps=3, scheduler="DDIM", scale=0.0)
    latents = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(3))
    from diffusers import DDIMScheduler

    plain.scheduler = DDIMScheduler.from_config(plain.scheduler.config)
    ref = plain("a sks icon", num_inference_steps=3, latents=latents, generator=torch.Generator().manual_seed(3)).images[0]
    assert np.abs(arr(ours["base"][0][0]) - arr(ref)).max() <= 1
    assert np.abs(arr(ours["dora"][0][0]) - arr(ref)).max() > 1  # DoRA at scale 0 keeps its magnitudes
    assert np.abs(arr(ours["lora"][0][0]) - arr(ref)).max() <= 1  # LoRA at scale 0 is the base model


def test_ui_paths_stay_under_the_adapters_root(tmp_path, adapters):
    root = adapters["dora"].parent
    assert resolve_under_root(root, "dora") == adapters["dora"].resolve()
    for bad, message in [("../", "outside the adapters root"), ("/etc", "outside the adapters root"),
                         ("dora/../../x", "outside the adapters root"), ("", "give a folder"),
                         ("missing", "not a folder")]:
        with pytest.raises(AppError, match=message):
            resolve_under_root(root, bad)
    link = root / "escape"
    if not link.exists():
        link.symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(AppError, match="leads outside"):
        resolve_under_root(root, "escape")
    with pytest.raises(AppError, match="start the app with --adapters-root"):
        resolve_under_root(None, "dora")
    assert {"dora", "lora"} <= set(find_adapters(root))


def test_bad_adapters_give_messages_and_the_app_keeps_working(comp, tiny_sd_path, adapters, tmp_path):
    root = comp.root
    (root / "pickled").mkdir(exist_ok=True)
    (root / "pickled" / "pytorch_lora_weights.bin").write_bytes(b"not loaded")
    with pytest.raises(AppError, match=r"holds pytorch_lora_weights.bin but no .*refused on purpose: loading a pickle "
                                       r"can run code; save it as .safetensors"):
        comp.load("lora", "pickled", from_ui=True)
    other = tmp_path / "wide"
    build_tiny_pipeline(cross_attention_dim=48).save_pretrained(other)
    wide = Comparison(str(other), adapters_root=root, device="cpu")
    with pytest.raises(AppError, match="does not fit this base model"):
        wide.load("dora", "dora", from_ui=True)
    with pytest.raises(AppError, match="type a prompt"):
        comp.generate("  ")
    with pytest.raises(AppError, match="multiples of 8"):
        comp.generate("x", width=60)
    assert set(comp.generate("a sks icon", steps=2)) == {"base", "lora", "dora"}  # still fine


def test_merged_folders_are_columns_too(comp, adapters, tmp_path):
    fused = export_fused(adapters["dora"], comp.root / "fused-dora")
    try:
        adapter_run = comp.generate("a sks icon", seed=4, steps=3)
        comp.load("dora", "fused-dora", from_ui=True)
        assert "merged" in comp.captions()["dora"]
        merged_run = comp.generate("a sks icon", seed=4, steps=3)
        assert np.abs(arr(merged_run["dora"][0][0]) - arr(adapter_run["dora"][0][0])).max() <= 1
        assert np.array_equal(arr(merged_run["base"][0][0]), arr(adapter_run["base"][0][0]))
    finally:
        comp.load("dora", adapters["dora"])
        shutil.rmtree(fused)


def test_safe_defaults():
    from app.main import parse

    args = parse([])
    assert args.host == "127.0.0.1" and args.share is False  # this machine only, no public link
    assert parse(["--share", "--host", "0.0.0.0"]).share is True  # only when asked


def test_difference_map():
    a = Image.new("RGB", (8, 8), (10, 10, 10))
    b = a.copy()
    b.putpixel((3, 4), (110, 10, 10))
    d = np.asarray(difference_map(a, b))
    assert d.shape == (8, 8, 3) and d[4, 3].sum() > 0 and d.sum() == d[4, 3].sum()
    assert np.asarray(difference_map(a, a)).max() == 0


# ---- the page in a real browser ------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_app(tiny_sd_path, adapters):
    port = free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "app", "--base", str(tiny_sd_path), "--dora", str(adapters["dora"]),
                             "--lora", str(adapters["lora"]), "--adapters-root", str(adapters["dora"].parent),
                             "--port", str(port), "--device", "cpu", "--max-work", "100000000",
                             "--models-root", str(tiny_sd_path.parent)],  # the Train tab's local bases
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(120):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read()) from None
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def column_images(page, key):
    """The pictures of result column `key` (data URIs in the results block)."""
    srcs = page.locator(f"#col-{key} img.dd-cell").evaluate_all("els => els.map(e => e.src)")
    return [Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB") for src in srcs]


def few_steps(page, steps: int = 4):
    """Sampling steps down from the page's 20: every check here compares pictures drawn alike, and
    each column's draw costs a step count's worth of denoiser calls."""
    page.locator("#steps input[type=number]").fill(str(steps))
    page.locator("#steps input[type=number]").press("Enter")


def launch(playwright):
    """Debian's chromium, headless, quiet."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"])


def tops(page, keys):
    return [page.locator(f"#col-{k}").bounding_box()["y"] for k in keys]


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (CI installs it)")
def test_page_in_a_real_browser(served_app, adapters, tmp_path):
    from playwright.sync_api import sync_playwright

    from dreambooth_dora.training.validation import cell_scale

    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(served_app)
        few_steps(page)
        page.locator("#prompt textarea").fill("a sks icon, 3d render")
        page.locator("#generate").click()
        page.locator("#col-lora img.dd-cell").first.wait_for(timeout=120_000)
        shown = {key: column_images(page, key) for key in ("base", "dora", "lora")}
        for key, images in shown.items():
            assert len(images) == 1 and images[0].size == (64, 64), key
            assert arr(images[0]).std() > 1, key  # a picture, not a blank
        assert np.abs(arr(shown["dora"][0]) - arr(shown["lora"][0])).max() > 0
        assert np.abs(arr(shown["dora"][0]) - arr(shown["base"][0])).max() > 0
        assert "seed 0" in page.locator("#status").inner_text()
        assert "DoRA · rank 4" in page.locator("#col-dora").inner_text()
        # 1280 px: the three columns side by side; a picture enlarges on click and closes on click
        assert len(set(tops(page, ("base", "dora", "lora")))) == 1
        page.locator("#col-dora img.dd-cell").first.click()
        page.wait_for_function("getComputedStyle(document.getElementById('zoom-dora-0')).display === 'flex'",
                               timeout=10_000)
        assert page.locator("#zoom-dora-0 img").bounding_box()["width"] > 500  # large enough to judge
        page.locator("#zoom-dora-0").click()
        page.wait_for_function("getComputedStyle(document.getElementById('zoom-dora-0')).display === 'none'",
                               timeout=10_000)

        page.locator("#diff").click()  # the difference of two columns on demand (A: the last, B: the base)
        page.locator("#diff-image img").first.wait_for(timeout=60_000)
        heat = Image.open(io.BytesIO(page.request.get(page.locator("#diff-image img").first.get_attribute("src")).body()))
        assert heat.size == (256, 256) and arr(heat.convert("RGB")).max() > 0  # 64 px enlarged 4x, nearest
        assert np.array_equal(arr(heat.convert("RGB"))[::4, ::4],
                              arr(difference_map(shown["lora"][0], shown["base"][0])))
        assert page.locator("#diff-image img").first.bounding_box()["width"] >= 250  # as large as the cards show
        page.wait_for_function("document.querySelector('#diff-status').innerText.includes('largest per-pixel')",
                               timeout=30_000)
        assert "seed 0" in page.locator("#status").inner_text()  # the status line keeps its own message

        # a 2 x 3 grid (seeds 0 and 1 x base, dora, lora), its cost first, streamed, saved, read back
        page.locator("#grid-row-values textarea").fill("0, 1")
        page.wait_for_function("document.querySelector('#grid-cost').innerText.includes('2 x 3 = 6 cells')",
                               timeout=30_000)
        page.locator("#draw-grid").click()
        page.wait_for_function("document.querySelector('#grid-progress').innerText.includes('Saved')",
                               timeout=180_000)
        saved = Path(re.search(r"Saved (\S+\.png)", page.locator("#grid-progress").inner_text()).group(1))
        assert saved.parent == adapters["dora"].parent / "grids" and saved.with_suffix(".json").is_file()
        grid, k = arr(Image.open(saved).convert("RGB")), cell_scale((64, 64))
        width = 3 * 64 * k
        for c, key in enumerate(("base", "dora", "lora")):  # row 0 (seed 0): the single generation's pictures
            x0 = grid.shape[1] - width + c * 64 * k
            y0 = grid.shape[0] - 2 * 64 * k
            cell = grid[y0:y0 + 64 * k:k, x0:x0 + 64 * k:k]
            assert np.abs(cell - arr(shown[key][0])).max() <= 1, key
        assert page.locator("#grid-image img").count() == 1
        page.locator("#grid-image img").scroll_into_view_if_needed()
        box = page.locator("#grid-image img").bounding_box()  # at its own size: labels never shrunk
        assert box["width"] == Image.open(saved).width
        covered = page.evaluate("(([x, y]) => document.elementFromPoint(x, y).tagName)",
                                [box["x"] + 4, box["y"] + 4])
        assert covered == "IMG"  # nothing (no badge) lies over the first column's header

        # a run's checkpoints as columns and the ComfyUI view of the DoRA column, without a restart
        page.get_by_text("Columns: load adapters").click()
        page.locator("#adapter-path textarea").fill("dora")
        page.locator("#label textarea").fill("run")
        page.locator("#load-run").click()
        page.wait_for_function("document.querySelector('#load-status').innerText.includes('run step 4')",
                               timeout=60_000)
        page.locator("#add-view").click()  # the newest adapter column, as ComfyUI draws its export
        page.wait_for_function("document.querySelector('#load-status').innerText.includes('as ComfyUI')",
                               timeout=60_000)
        assert "run step 2" in page.locator("#column-list").inner_text()
        # the columns live on the server: a reload (and any new tab) shows the page-added ones
        page.reload()
        few_steps(page)  # a reload shows the page's defaults again
        page.wait_for_function("document.querySelector('#shown') !== null && "
                               "document.querySelector('#shown').innerText.includes('run step 4 as ComfyUI')",
                               timeout=30_000)
        assert "run step 2" in page.locator("#grid-pick").inner_text()
        page.get_by_text("Columns: load adapters").click()
        page.wait_for_function("document.querySelector('#column-list') !== null && "
                               "document.querySelector('#column-list').innerText.includes('run step 2')",
                               timeout=30_000)
        page.locator("#prompt textarea").fill("a sks icon, 3d render")
        page.locator("#generate").click()
        page.locator("#col-run-step-4-as-comfyui img.dd-cell").first.wait_for(timeout=120_000)
        assert page.locator("#col-diff-run-step-4-as-comfyui img.dd-cell").count() == 1  # beside its per-pixel difference
        assert np.abs(arr(column_images(page, "run-step-4")[0]) - arr(shown["dora"][0])).max() <= 1
        widths = page.locator(".dd-col").evaluate_all("els => els.map(e => e.getBoundingClientRect().width)")
        assert len(widths) >= 6 and max(widths) - min(widths) < 1, widths  # every row's cards alike
        assert len(set(tops(page, ("base", "run-step-4-as-comfyui")))) > 1  # they did wrap into rows
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)

        # a phone's width: the columns wrap, nothing overflows sideways
        page.set_viewport_size({"width": 390, "height": 844})
        time.sleep(0.5)
        assert len(set(tops(page, ("base", "dora", "lora")))) > 1
        assert page.evaluate("document.documentElement.scrollWidth") <= 391
        page.set_viewport_size({"width": 1280, "height": 900})

        # a bad path: a message, and the app keeps working
        page.locator("#adapter-path textarea").fill("../../etc")
        page.locator("#load").click()
        page.wait_for_function("document.querySelector('#load-status').innerText.includes('Error')", timeout=30_000)
        assert "outside the adapters root" in page.locator("#load-status").inner_text()

        # two browsers at once are served in turn, each gets its own complete answer
        second = browser.new_page(viewport={"width": 1280, "height": 900})
        second.goto(served_app)
        few_steps(second)
        second.locator("#prompt textarea").fill("a sks icon, 3d render")
        page.locator("#seed input").fill("5")
        second.locator("#seed input").fill("0")
        page.locator("#generate").click()
        second.locator("#generate").click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('seed 5')", timeout=120_000)
        second.wait_for_function("document.querySelector('#status').innerText.includes('seed 0')", timeout=120_000)
        second.locator("#col-dora img.dd-cell").first.wait_for(timeout=120_000)
        for key in ("base", "dora", "lora"):  # the second browser, seed 0: the same pictures as the first run
            assert np.abs(arr(column_images(second, key)[0]) - arr(shown[key][0])).max() <= 1, key

        # Stop ends a long request part-way (outside the queue): one calm line where the result goes
        page.locator("#steps input[type=number]").fill("100")
        page.locator("#steps input[type=number]").press("Enter")
        page.locator("#generate").click()
        time.sleep(1.5)  # it is running (six columns of 100 steps take far longer)
        page.locator("#stop").click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('Stopped after step')",
                               timeout=60_000)
        said = page.locator("#status").inner_text()
        assert re.search(r"Stopped after step \d+ of 100 \(\w+ column\)", said) and "Error" not in said, said
        assert page.locator("#stop-status").inner_text().strip() == ""  # said once, in one place
        # a grid: the stop is said beside the grid, the cells drawn so far stay, nothing is saved
        grids_before = sorted((adapters["dora"].parent / "grids").glob("*.png"))
        page.locator("#steps input[type=number]").fill("30")  # a cell takes a moment, the grid far longer
        page.locator("#steps input[type=number]").press("Enter")
        page.locator("#draw-grid").click()
        page.wait_for_function("document.querySelector('#grid-progress').innerText.includes('drawing: 1 of')",
                               timeout=120_000)
        page.locator("#stop").click()
        page.wait_for_function("document.querySelector('#grid-progress').innerText.includes('Stopped after')",
                               timeout=120_000)
        said = page.locator("#grid-progress").inner_text()
        assert re.search(r"Stopped after \d+ of \d+ cells .*not saved", said) and "Error" not in said, said
        assert "Error" not in page.locator("#status").inner_text()
        assert sorted((adapters["dora"].parent / "grids").glob("*.png")) == grids_before
        page.locator("#steps input[type=number]").fill("2")
        page.locator("#steps input[type=number]").press("Enter")
        page.locator("#generate").click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('2 steps')", timeout=120_000)
        browser.close()


def job_line(page) -> str:
    return page.locator("#job-status").inner_text()


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (CI installs it)")
def test_train_tab_in_a_real_browser(served_app, tiny_sd_path, adapters, tmp_path):
    """Pictures in, an adapter out: upload four pictures, edit a caption, a bad setting is the CLI's
    message and starts nothing, start a DoRA job on the app's base, see progress and the loss chart
    move, Stop, Resume, reload (still running), done, the adapter into Compare and drawn there. (A
    job's twins run one after the other and open as two columns: tests/test_train_jobs.py and
    tests/test_train_tab.py, without a second real trainer start here.)"""
    import json

    root = adapters["dora"].parent
    icons = sorted((REPO / "sample_data/3d_icon").glob("*.png"))[:4]
    try:
        train_tab_journey(served_app, tiny_sd_path, root, icons)
    finally:  # a trainer left running by a failed check must not outlive the test
        for record in root.glob("jobs/*/job.json"):
            pid = json.loads(record.read_text()).get("pid")
            if pid:
                try:
                    os.kill(pid, 9)
                except (ProcessLookupError, PermissionError):
                    pass


def train_tab_journey(served_app, tiny_sd_path, root, icons):
    import json

    from playwright.sync_api import sync_playwright

    from app.ui import slug

    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(served_app)
        page.get_by_role("tab", name="Train").click()
        page.locator("#dataset input, #dataset textarea").first.fill("browser-icons")
        page.locator("#pictures input[type=file]").set_input_files([str(p) for p in icons])
        page.wait_for_function("document.querySelector('#data-status').innerText.includes('added 4 picture')",
                               timeout=60_000)
        assert page.locator("#thumbs img").count() == 4
        page.locator('#captions [data-testid="cell-1-1"]').dblclick()  # picture 2's caption
        page.keyboard.type("a sks icon on a blue background")
        page.keyboard.press("Enter")
        page.locator("#save-captions").click()
        page.wait_for_function("document.querySelector('#data-status').innerText.includes('saved 4 caption')",
                               timeout=30_000)
        rows = [json.loads(line) for line in (root / "datasets/browser-icons/metadata.jsonl").read_text().splitlines()]
        assert rows[1] == {"file_name": icons[1].name, "text": "a sks icon on a blue background"}

        base = page.locator("#base input")
        base.fill(str(tiny_sd_path))
        base.press("Enter")
        page.locator("#train-steps input").fill("60")
        page.locator("#method").get_by_text("DoRA", exact=True).click()
        page.get_by_text("Advanced: the other").click()
        for name, value in (("resolution", "64"), ("validation_prompt", "a sks icon"), ("validation_steps", "60"),
                            ("num_validation_images", "1"), ("validation_inference_steps", "2"),
                            ("checkpointing_steps", "1000"), ("lr_scheduler", "bogus")):
            page.locator(f"#adv-{name} input, #adv-{name} textarea").first.fill(value)
        page.locator("#start").click()  # a bad setting: the CLI's one line, and no job
        page.wait_for_function("document.querySelector('#settings-status').innerText.includes('Error')",
                               timeout=30_000)
        assert "lr_scheduler" in page.locator("#settings-status").inner_text()
        assert not (root / "jobs").exists() or not any((root / "jobs").iterdir())
        page.locator("#adv-lr_scheduler input, #adv-lr_scheduler textarea").first.fill("")
        page.locator("#start").click()
        page.wait_for_function("document.querySelector('#settings-status').innerText.includes('Queued job')",
                               timeout=30_000)
        page.wait_for_function("document.querySelector('#job-status').innerText.includes('step ')", timeout=120_000)
        first = int(re.search(r"step (\d+) /", job_line(page)).group(1))
        page.wait_for_function(f"(m => m && +m[1] > {first})(document.querySelector('#job-status').innerText"
                               ".match(/step (\\d+) \\//))", timeout=60_000)
        assert page.locator("#loss-plot canvas, #loss-plot svg").count() > 0  # the chart is drawn
        page.locator("#job-stop").click()
        page.wait_for_function("document.querySelector('#job-status').innerText.includes(': stopped')",
                               timeout=60_000)
        stopped = job_line(page)
        assert "run dora (stopped)" in stopped and "step 60 / 60" not in stopped
        page.locator("#job-resume").click()
        page.wait_for_function("document.querySelector('#settings-status').innerText.includes('resume: job')",
                               timeout=30_000)
        page.reload()  # the job runs on without the page
        page.get_by_role("tab", name="Train").click()
        page.wait_for_function("/: (queued|running)/.test(document.querySelector('#job-status').innerText)",
                               timeout=30_000)
        page.wait_for_function("document.querySelector('#job-status').innerText.includes(': done')",
                               timeout=240_000)
        assert "step 60 / 60" in job_line(page), (stopped, job_line(page))
        assert page.locator("#job-grid img").count() == 1  # the newest validation grid
        job_id = page.locator("#job input").first.input_value()
        page.locator("#job-compare").click()
        page.wait_for_function("document.querySelector('#shown') !== null && "
                               f"document.querySelector('#shown').innerText.includes('{job_id} dora')",
                               timeout=60_000)
        assert page.locator("#prompt textarea").input_value() == "a sks icon, 3d render"
        few_steps(page)
        page.locator("#generate").click()
        page.locator(f"#col-{slug(job_id + ' dora')} img.dd-cell").first.wait_for(timeout=120_000)
        assert arr(column_images(page, slug(job_id + " dora"))[0]).std() > 1
        assert not (root / "jobs" / job_id / "lora").exists()  # DoRA alone was asked for
        browser.close()


# ---- nothing lost, nothing stuck ------------------------------------------------------------

def test_a_failed_load_keeps_the_columns_adapter(comp, adapters, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import save_file

    import torch

    before = comp.generate("a sks icon", seed=11, steps=2)
    broken = comp.root / "broken"
    broken.mkdir(exist_ok=True)
    src = adapters["dora"] / "pytorch_lora_weights.safetensors"
    with safe_open(str(src), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    key = next(k for k in tensors if k.startswith("unet.") and k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 8)  # made for a wider model
    save_file(tensors, str(broken / "pytorch_lora_weights.safetensors"), metadata=meta)
    with pytest.raises(AppError, match="does not fit this base model"):
        comp.load("dora", "broken", from_ui=True)
    names = comp._loaded_adapters()

    def fails_half_way(*args, **kwargs):  # the stock loader dies part-way through
        raise RuntimeError("out of memory")

    monkeypatch.setattr(comp.pipe, "load_lora_weights", fails_half_way)
    with pytest.raises(AppError, match="could not load 'lora'.*out of memory"):
        comp.load("dora", adapters["lora"])
    monkeypatch.undo()
    assert comp._loaded_adapters() == names and "DoRA" in comp.captions()["dora"]
    after = comp.generate("a sks icon", seed=11, steps=2)
    for col in before:  # every column still draws exactly what it drew before
        assert np.array_equal(arr(before[col][0][0]), arr(after[col][0][0])), col


def test_requests_have_a_work_limit_and_stop_works(comp):
    import threading

    with pytest.raises(AppError, match=r"too large: 2048x2048 px x 20 steps x 1 image\(s\) x 3 column\(s\) = "
                                       r"251,658,240 > the limit 1,400,000.*--max-work"):
        comp.generate("a sks icon", width=2048, height=2048, steps=20)
    small = Comparison.__new__(Comparison)
    small.__dict__.update(comp.__dict__)
    small.max_work = 64 * 64 * 3 * 1 * 2 - 1  # one column too many
    with pytest.raises(AppError, match="the limit"):
        small.generate("a sks icon", steps=3, columns=("base", "dora"))
    assert set(small.generate("a sks icon", steps=3, columns=("dora",))) == {"dora"}

    result = {}

    def long_request():
        try:
            comp.generate("a sks icon", steps=300, columns=("base",))
        except AppError as err:
            result["error"] = str(err)

    assert comp.request_stop() is False  # nothing running: nothing to stop, the next request is unaffected
    worker = threading.Thread(target=long_request)
    worker.start()
    time.sleep(0.5)
    assert comp.request_stop() is True
    worker.join(timeout=60)
    assert not worker.is_alive()
    stopped_at = int(result["error"].split("stopped after step ")[1].split(" ")[0])
    assert 0 < stopped_at < 300 and "of 300 (the base column)" in result["error"]
    assert set(comp.generate("a sks icon", steps=2)) == {"base", "lora", "dora"}  # the next request runs


def test_a_port_in_use_is_one_line_before_the_model_loads(capsys, monkeypatch):
    import app.core
    from app.main import main, parse

    monkeypatch.setattr(app.core, "Comparison", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot listen on 127.0.0.1:{port}: Address already in use (another server there? pick one with --port)"
    assert main(["--port", "70000"]) == 2 and "between 1 and 65535" in capsys.readouterr().err
    assert main(["--max-work", "0", "--port", str(free_port())]) == 2
    assert "--max-work must be >= 1" in capsys.readouterr().err
    assert parse(["--max-work", "5000000"]).max_work == 5_000_000


# ---- any columns, checkpoints, UI views, X/Y grids ----------------------------------------------

@pytest.fixture
def many(tiny_sd_path, adapters, tmp_path):
    c = Comparison(str(tiny_sd_path), adapters_root=adapters["dora"].parent, device="cpu",
                   grids_dir=tmp_path / "grids")
    c.load("dora", adapters["dora"])
    c.load("lora", adapters["lora"])
    return c


def test_grid_cells_share_their_rows_latents(many):
    from app.core import GridSpec

    spec = GridSpec("a sks icon", rows="seeds", row_values=[3, 9], cols="columns", col_values=["base", "dora", "lora"],
                    steps=2)
    frames = list(many.draw_grid(spec))
    assert [f[0] for f in frames] == list(range(7)) and frames[-1][1] == 6  # streamed cell by cell
    _, pictures = many.last_grid
    for r, seed in enumerate((3, 9)):
        single = many.generate("a sks icon", seed=seed, steps=2)  # one click: every column from one latent
        for c, label in enumerate(("base", "dora", "lora")):
            assert np.array_equal(arr(pictures[(r, c)]), arr(single[label][0][0])), (seed, label)
    scales = GridSpec("a sks icon", rows="prompts", row_values=["a sks icon", "a red cube"], cols="scales",
                      col_values=[0.5, 1.0], column="dora", steps=2, seed=4)
    list(many.draw_grid(scales))
    _, pictures = many.last_grid
    half = many.generate("a red cube", seed=4, steps=2, scale=0.5, columns=["dora"])["dora"][0][0]
    assert np.array_equal(arr(pictures[(1, 0)]), arr(half))
    assert np.abs(arr(pictures[(1, 0)]) - arr(pictures[(1, 1)])).max() > 0  # the scale matters
    with pytest.raises(AppError, match="no adapter scale"):
        many.plan_grid(GridSpec("x", rows="scales", row_values=[1.0], cols="columns", col_values=["base"]))
    with pytest.raises(AppError, match="the limit"):
        many.plan_grid(GridSpec("x", rows="seeds", row_values=list(range(400)), cols="columns",
                                col_values=["base", "dora"], steps=20))
    assert "2 x 3 = 6 cells" in many.grid_cost(spec) and "last measured speed" in many.grid_cost(spec)


def test_a_runs_checkpoints_become_columns_in_step_order(many, adapters):
    from app.core import run_snapshots

    assert [step for step, _ in run_snapshots(adapters["dora"])] == [2, 4]
    labels = many.add_run(adapters["dora"], "run")
    assert labels == ["run step 2", "run step 4"] and list(many.columns)[-2:] == labels
    assert "4 steps" in many.captions()["run step 4"] and "checkpoint-2" in many.captions()["run step 2"]
    out = many.generate("a sks icon", seed=1, steps=2, columns=["dora", "run step 2", "run step 4"])
    assert np.array_equal(arr(out["run step 4"][0][0]), arr(out["dora"][0][0]))  # the final adapter
    assert np.abs(arr(out["run step 2"][0][0]) - arr(out["dora"][0][0])).max() > 0
    assert many.remove("run step 2") == "removed run step 2" and "run step 2" not in many.columns
    with pytest.raises(AppError, match="base column stays"):
        many.remove("base")
    with pytest.raises(AppError, match="label"):
        many.load("../x", adapters["dora"])


def test_ui_views_apply_the_consumers_rules_to_the_exported_file(many, adapters, tmp_path):
    import torch
    from safetensors.torch import load_file

    from dreambooth_dora.formats.consumers import merge, read_kohya_modules
    from dreambooth_dora.formats.export import export_kohya

    many.add_view("dora", "comfyui")
    many.add_view("dora", "a1111")
    many.add_view("lora", "comfyui")
    file = export_kohya(adapters["dora"], tmp_path / "dora.safetensors")
    modules = read_kohya_modules(load_file(str(file)))
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    view = many.columns["dora as ComfyUI"].pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    base = StableDiffusionPipeline_from(many.base_path).unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    expected = merge("comfyui", base.weight.detach().float(), modules[key])  # the rule on the file read back
    assert torch.allclose(view.weight.float(), expected, atol=1e-6)
    out = many.generate("a sks icon", seed=2, steps=3)
    gap = np.abs(arr(out["dora as ComfyUI"][0][0]) - arr(out["dora"][0][0])).max()
    assert gap > 0 and np.abs(arr(out["dora as A1111"][0][0]) - arr(out["dora"][0][0])).max() > 0
    assert np.abs(arr(out["lora as ComfyUI"][0][0]) - arr(out["lora"][0][0])).max() <= 1  # LoRA: exact everywhere
    diffs = many.view_differences(out)
    assert set(diffs) == {"dora as ComfyUI", "dora as A1111", "lora as ComfyUI"} and diffs["dora as ComfyUI"][1] == gap


def StableDiffusionPipeline_from(path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(path)


def test_saved_grid_is_a_png_and_json_that_draw_it_again(many, tmp_path):
    import json

    from app.core import GridSpec
    from app.grid import main as grid_main
    from dreambooth_dora.training.validation import cell_scale

    many.add_view("dora", "comfyui")
    spec = GridSpec("a sks icon", rows="seeds", row_values=[0, 1], cols="columns",
                    col_values=["base", "dora", "dora as ComfyUI"], steps=2)
    list(many.draw_grid(spec))
    png, js = many.save_grid(*many.last_grid)
    png2, js2 = many.save_grid(*many.last_grid)
    assert png.parent == tmp_path / "grids" and png2 != png and js2 != js  # a second save never replaces the first
    settings = json.loads(js.read_text())
    assert settings["grid"]["row_values"] == [0, 1] and settings["columns"]["dora as ComfyUI"]["rule"] == "comfyui"
    assert grid_main([str(js), "--out", str(png)]) == 2  # an existing file is not replaced
    moved = tmp_path / "moved.json"
    moved.write_text(js.read_text().replace(str(many.columns["dora"].path), str(tmp_path / "gone")))
    assert grid_main([str(moved), "--out", str(tmp_path / "x.png")]) == 2 and not (tmp_path / "x.png").exists()
    again = tmp_path / "again.png"
    assert grid_main([str(js), "--out", str(again)]) == 0
    assert np.array_equal(arr(Image.open(again).convert("RGB")), arr(Image.open(png).convert("RGB")))
    k, grid = cell_scale((64, 64)), arr(Image.open(png).convert("RGB"))
    cell = grid[-64 * k::k, -64 * k::k]  # the last row's last cell, back at its own size
    assert np.array_equal(cell, arr(many.last_grid[1][(1, 2)]))


def test_a_grid_saved_from_anywhere_draws_again_from_anywhere(tiny_sd_path, adapters, tmp_path, monkeypatch, capfd):
    """Sources loaded by a relative path are saved absolute (and relative to the JSON): the grid
    draws again from another folder, and after the project moved as a whole; quietly."""
    import json

    from app.core import GridSpec
    from app.grid import main as grid_main

    project = tmp_path / "project"
    shutil.copytree(adapters["dora"], project / "cols" / "dora")
    monkeypatch.chdir(project)
    comp = Comparison(str(tiny_sd_path), device="cpu", grids_dir=project / "grids")
    comp.load("dora", "cols/dora")  # relative, as a command line gives it
    spec = GridSpec("a sks icon", rows="seeds", row_values=[0], cols="columns", col_values=["base", "dora"], steps=2)
    list(comp.draw_grid(spec))
    png, js = comp.save_grid(*comp.last_grid)
    saved = json.loads(js.read_text())["columns"]["dora"]
    assert Path(saved["path"]).is_absolute() and saved["relative_path"] == "../cols/dora"
    monkeypatch.chdir(tmp_path)  # another folder
    capfd.readouterr()
    assert grid_main([str(js), "--out", str(tmp_path / "again.png")]) == 0
    out, err = capfd.readouterr()
    assert len((out + err).strip().splitlines()) <= 2, out + err  # quiet like the app: "wrote ..." only
    first = arr(Image.open(png).convert("RGB"))
    shutil.move(project, tmp_path / "moved")  # the grid and its sources moved together
    moved = tmp_path / "moved" / "grids" / js.name
    assert grid_main([str(moved), "--out", str(tmp_path / "moved.png")]) == 0
    for again in ("again.png", "moved.png"):
        assert np.array_equal(arr(Image.open(tmp_path / again).convert("RGB")), first)


def test_help_and_readme_state_the_same_gpu_limit(capsys):
    from app.limits import GPU_FACTOR
    from app.main import parse

    with pytest.raises(SystemExit):
        parse(["--help"])
    assert f"{GPU_FACTOR}x that on a GPU" in " ".join(capsys.readouterr().out.split())
    assert f"{GPU_FACTOR}x that on a GPU" in " ".join((REPO / "README.md").read_text().split())
