"""How docs/app.png, docs/quickstart_grid.png and docs/train_tab*.png are made (from the repo root):

    python docs/make_screenshot.py            # after the quick start: the Compare tab and its grid
    python docs/make_screenshot.py --train    # the Train tab (in a temporary adapters root)

Compare: starts the app on the embedded model with both quick-start runs' checkpoints as columns
and the ComfyUI view of the final DoRA adapter, draws a grid of three seeds against every column
in a real browser (Debian's chromium), and saves the page and the grid it saved.

Train: starts the app on the embedded model in a temporary adapters root, uploads the 3D-icon
sample pictures, edits a caption, starts a DoRA + LoRA twins job and saves the tab while it runs
(`docs/train_tab.png`) and when it is done (`docs/train_tab_done.png`).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(args: list[str], port: int):
    """The app in a process of its own, once it answers (None if it ended first)."""
    proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), "--device", "cpu", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                print(proc.stdout.read(), file=sys.stderr)
                return None
            time.sleep(0.5)
    return proc


def train_tab() -> int:
    import tempfile

    from playwright.sync_api import sync_playwright

    port = free_port()
    with tempfile.TemporaryDirectory() as root:
        proc = serve(["--adapters-root", root], port)
        if proc is None:
            return 1
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                            args=["--headless", "--no-sandbox", "--disable-gpu"])
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.goto(f"http://127.0.0.1:{port}/")
                page.get_by_role("tab", name="Train").click()
                page.locator("#dataset input, #dataset textarea").first.fill("3d-icons")
                icons = sorted((ROOT / "sample_data/3d_icon").glob("*.png"))
                page.locator("#pictures input[type=file]").set_input_files([str(p) for p in icons])
                page.wait_for_function("document.querySelector('#data-status').innerText.includes('added')",
                                       timeout=60_000)
                page.locator('#captions [data-testid="cell-0-1"]').dblclick()
                page.keyboard.type("a sks icon, 3d render, front view")
                page.keyboard.press("Enter")
                page.locator("#save-captions").click()
                page.locator("#train-steps input").fill("300")
                page.get_by_text("Advanced: the other").click()
                for name, value in (("resolution", "32"), ("validation_prompt", "a sks icon, 3d render"),
                                    ("validation_steps", "100"), ("num_validation_images", "2")):
                    page.locator(f"#adv-{name} input, #adv-{name} textarea").first.fill(value)
                page.get_by_text("Advanced: the other").click()
                page.locator("#start").click()
                page.wait_for_function("(m => m && +m[1] >= 120)(document.querySelector('#job-status').innerText"
                                       ".match(/step (\\d+) \\//))", timeout=600_000)
                time.sleep(1.5)
                page.screenshot(path=str(ROOT / "docs" / "train_tab.png"), full_page=True)
                page.wait_for_function("document.querySelector('#job-status').innerText.includes(': done')",
                                       timeout=900_000)
                time.sleep(1.5)
                page.screenshot(path=str(ROOT / "docs" / "train_tab_done.png"), full_page=True)
                browser.close()
            print("wrote docs/train_tab.png and docs/train_tab_done.png")
            return 0
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> int:
    from playwright.sync_api import sync_playwright

    if "--train" in sys.argv[1:]:
        return train_tab()

    runs = {"DoRA": ROOT / "outputs/quickstart_tiny_icon_dora", "LoRA": ROOT / "outputs/quickstart_tiny_icon_lora"}
    if not all((p / "checkpoint-100").is_dir() for p in runs.values()):
        print("error: run the quick start first (README, Set up)", file=sys.stderr)
        return 2
    port = free_port()
    proc = serve([*[a for label, path in runs.items() for a in ("--run", f"{label}={path}")],
                  "--view", "DoRA step 400:comfyui", "--adapters-root", str(ROOT / "outputs")], port)
    if proc is None:
        return 1
    url = f"http://127.0.0.1:{port}/"
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                        args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.locator("#prompt textarea").fill("a sks icon, 3d render")
            page.locator("#grid-row-values textarea").fill("0, 1, 2")
            page.wait_for_function("document.querySelector('#grid-cost').innerText.includes('cells')", timeout=30_000)
            page.locator("#draw-grid").click()
            page.wait_for_function("document.querySelector('#grid-progress').innerText.includes('Saved')",
                                   timeout=600_000)
            saved = Path(re.search(r"Saved (\S+\.png)", page.locator("#grid-progress").inner_text()).group(1))
            page.locator("#generate").click()
            page.locator("#col-dora-step-400-as-comfyui img.dd-cell").first.wait_for(timeout=300_000)
            page.screenshot(path=str(ROOT / "docs" / "app.png"), full_page=True)
            browser.close()
        shutil.copy(saved, ROOT / "docs" / "quickstart_grid.png")
        print(f"wrote docs/app.png and docs/quickstart_grid.png (from {saved})")
        return 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
