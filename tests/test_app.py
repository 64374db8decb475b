"""The comparison app: its functions on the tiny pipeline, its refusals, and the page in a real
browser (Debian's chromium driven by Playwright)."""

import io
import os
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
from dreambooth_dora.export import export_fused
from dreambooth_dora.tiny import build_tiny_pipeline

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
    with pytest.raises(AppError, match="no adapter file"):
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
                             "--port", str(port), "--device", "cpu"],
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


def gallery_images(page, slot):
    srcs = page.locator(f"#gallery-{slot} img").evaluate_all("els => els.map(e => e.src)")
    return [Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB") for src in srcs]


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (CI installs it)")
def test_page_in_a_real_browser(served_app, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(served_app)
        page.locator("#prompt textarea").fill("a sks icon, 3d render")
        page.locator("#generate").click()
        for slot in ("base", "lora", "dora"):
            page.locator(f"#gallery-{slot} img").first.wait_for(timeout=120_000)
        shown = {slot: gallery_images(page, slot) for slot in ("base", "lora", "dora")}
        for slot, images in shown.items():
            assert len(images) == 1 and images[0].size == (64, 64), slot
            assert arr(images[0]).std() > 1, slot  # a picture, not a blank
        assert np.abs(arr(shown["dora"][0]) - arr(shown["lora"][0])).max() > 0
        assert np.abs(arr(shown["dora"][0]) - arr(shown["base"][0])).max() > 0
        assert "seed 0" in page.locator("#status").inner_text()
        assert "DoRA · rank 4" in page.locator("#gallery-dora").inner_text()
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)

        page.locator("#diff").click()  # the difference view on demand
        page.locator("#diff-image img").first.wait_for(timeout=60_000)
        heat = Image.open(io.BytesIO(page.request.get(page.locator("#diff-image img").first.get_attribute("src")).body()))
        assert heat.size == (64, 64) and arr(heat.convert("RGB")).max() > 0
        assert "largest per-pixel difference" in page.locator("#status").inner_text()

        # a bad path: a message, and the app keeps working
        page.get_by_text("Load another adapter or merged pipeline").click()
        page.locator("#adapter-path textarea").fill("../../etc")
        page.locator("#load").click()
        page.wait_for_function("document.querySelector('#load-status').innerText.includes('Error')", timeout=30_000)
        assert "outside the adapters root" in page.locator("#load-status").inner_text()

        # two browsers at once are served in turn, each gets its own complete answer
        second = browser.new_page(viewport={"width": 1400, "height": 1000})
        second.goto(served_app)
        second.locator("#prompt textarea").fill("a sks icon, 3d render")
        page.locator("#seed input").fill("5")
        second.locator("#seed input").fill("0")
        page.locator("#generate").click()
        second.locator("#generate").click()
        page.wait_for_function("document.querySelector('#status').innerText.includes('seed 5')", timeout=120_000)
        second.wait_for_function("document.querySelector('#status').innerText.includes('seed 0')", timeout=120_000)
        second.locator("#gallery-dora img").first.wait_for(timeout=120_000)
        again = {slot: gallery_images(second, slot) for slot in ("base", "lora", "dora")}
        for slot in again:  # the second browser, seed 0: the same pictures as the first run
            assert np.abs(arr(again[slot][0]) - arr(shown[slot][0])).max() <= 1, slot
        browser.close()
    if os.environ.get("APP_SCREENSHOT"):  # how docs/app.png in the README is made
        shutil.copy(tmp_path / "app.png", os.environ["APP_SCREENSHOT"])
