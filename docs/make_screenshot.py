"""How docs/app.png and docs/quickstart_grid.png are made (after the quick start, from the repo root):

    python docs/make_screenshot.py

Starts the app on the embedded model with both quick-start runs' checkpoints as columns and the
ComfyUI view of the final DoRA adapter, draws a grid of three seeds against every column in a
real browser (Debian's chromium), and saves the page and the grid it saved.
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


def main() -> int:
    from playwright.sync_api import sync_playwright

    runs = {"DoRA": ROOT / "outputs/quickstart_tiny_icon_dora", "LoRA": ROOT / "outputs/quickstart_tiny_icon_lora"}
    if not all((p / "checkpoint-100").is_dir() for p in runs.values()):
        print("error: run the quick start first (README, Set up)", file=sys.stderr)
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "app", "--port", str(port), "--device", "cpu",
                             *[a for label, path in runs.items() for a in ("--run", f"{label}={path}")],
                             "--view", "DoRA step 400:comfyui", "--adapters-root", str(ROOT / "outputs")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    print(proc.stdout.read(), file=sys.stderr)
                    return 1
                time.sleep(0.5)
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
