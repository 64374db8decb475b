"""Proof that a restructuring changed nothing: the same recipes at two revisions, tensor for tensor.

    python benchmarks/same_tensors.py [--base REV] [--steps 60] [--keep DIR]

The code of `--base` (default: the revision before the package moved into its wings) is checked
out into a temporary git worktree; each recipe then trains once with that code and once with
this working tree, each in a fresh process (`python train_dreambooth_dora.py ...` run from the
code's own folder), on the same local models and data:

    sd-dora / sd-lora   the quick start (embedded toy-world, 3D icons) shortened to `--steps`,
                        with --train_text_encoder, prior preservation and --cache_latents
    sdxl-dora           a tiny SDXL pipeline (built once, here) with aspect buckets and pivotal
                        tuning (textual-inversion tokens)

Every tensor of the adapter file (and of the pivotal-tuning embeddings), the file's metadata
(minus the run id and paths), and every class image's and validation grid's pixels must be
bit-identical. Prints one table row per recipe, the metadata's differing fields named ('+key': a
setting added since --base); exits 1 on any difference (metadata differences only by added
settings are allowed with --new-settings-ok).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = "9c4c348"  # the flat package, before `families/` and the wings

RECIPES = {
    "sd-dora": ["--config", "train_configs/quickstart_tiny_icon_dora.yaml", "--train_text_encoder",
                "--with_prior_preservation", "--class_prompt", "a icon, 3d render", "--num_class_images", "4",
                "--cache_latents"],
    "sd-lora": ["--config", "train_configs/quickstart_tiny_icon_lora.yaml", "--train_text_encoder",
                "--with_prior_preservation", "--class_prompt", "a icon, 3d render", "--num_class_images", "4",
                "--cache_latents"],
    "sdxl-dora": ["--pretrained_model_name_or_path", "{sdxl}", "--instance_data_dir", "sample_data/3d_icon",
                  "--instance_prompt", "a TOK icon, 3d render", "--resolution", "32", "--rank", "4",
                  "--use_dora", "--train_text_encoder_ti", "--token_abstraction", "TOK",
                  "--aspect_buckets", "--bucket_step", "8", "--train_batch_size", "2",
                  "--learning_rate", "1e-3", "--seed", "0"],
}
UNSTABLE_METADATA = {"run_id", "output_dir", "instance_data_dir", "class_data_dir", "pretrained_model_name_or_path",
                     "base_model", "logging_dir"}


def run(code: Path, recipe: str, out: Path, steps: int, sdxl: Path) -> None:
    argv = [a.replace("{sdxl}", str(sdxl)) for a in RECIPES[recipe]]
    argv += ["--max_train_steps", str(steps), "--checkpointing_steps", "100000",
             "--output_dir", str(out / "run"), "--class_data_dir", str(out / "class"), "--report_to", "none"]
    env = {**os.environ, "PYTHONPATH": str(code), "DREAMBOOTH_DORA_CACHE": str(out.parent / "cache")}
    done = subprocess.run([sys.executable, "train_dreambooth_dora.py", *argv], cwd=code, env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{recipe} at {code} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


def scrub(value):
    """Metadata without what names the run (its id, its folders), JSON strings opened, at any depth."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if k not in UNSTABLE_METADATA}
    return value


def metadata_changes(a, b, where: str = "") -> list[str]:
    """The metadata paths that differ ('+key' added, '-key' gone, 'key' changed)."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [where or "value"]
    out = [f"+{where}{k}" for k in b.keys() - a.keys()] + [f"-{where}{k}" for k in a.keys() - b.keys()]
    for k in sorted(a.keys() & b.keys()):
        if a[k] != b[k]:
            out += metadata_changes(a[k], b[k], f"{where}{k}.")
    return sorted(out)


def differences(a: Path, b: Path) -> tuple[int, list[str]]:
    """(tensors compared, what differs) between two runs' outputs."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors import safe_open

    compared, diffs = 0, []
    files = sorted(p.relative_to(a) for p in (a / "run").glob("*.safetensors"))
    if sorted(p.relative_to(b) for p in (b / "run").glob("*.safetensors")) != files or not files:
        return 0, [f"different files: {files}"]
    for rel in files:
        with safe_open(a / rel, "pt") as fa, safe_open(b / rel, "pt") as fb:
            if set(fa.keys()) != set(fb.keys()):
                diffs.append(f"{rel}: keys differ")
                continue
            for key in fa.keys():
                compared += 1
                ta, tb = fa.get_tensor(key), fb.get_tensor(key)
                if ta.dtype != tb.dtype or ta.shape != tb.shape or not torch.equal(ta.view(-1).view(torch.uint8),
                                                                                   tb.view(-1).view(torch.uint8)):
                    diffs.append(f"{rel}:{key}")
            ma, mb = scrub(fa.metadata() or {}), scrub(fb.metadata() or {})
            if ma != mb:
                diffs.append(f"{rel}: metadata " + ", ".join(metadata_changes(ma, mb)))
    for img in sorted([*(a / "class").glob("*.png"), *(a / "run" / "validation").glob("*.png")]):
        other = b / img.relative_to(a)
        if not other.is_file() or not np.array_equal(np.asarray(Image.open(img)), np.asarray(Image.open(other))):
            diffs.append(f"picture {img.relative_to(a)}")
    return compared, diffs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default=BASE, help="the revision to compare with")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--keep", type=Path, help="leave the runs in this (new) folder")
    parser.add_argument("--new-settings-ok", action="store_true",
                        help="metadata that differs only by settings added since --base does not fail the check")
    args = parser.parse_args(argv)
    if args.keep and args.keep.exists() and (not args.keep.is_dir() or any(args.keep.iterdir())):
        raise SystemExit(f"error: --keep {args.keep} already holds something; give a new or empty folder")
    sys.path.insert(0, str(REPO))
    from dreambooth_dora.toy.tiny import save_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        old = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.base],
                       check=True, capture_output=True)
        try:
            sdxl = save_tiny_pipeline(root / "models" / "tiny-sdxl", sdxl=True)
            failed = False
            print(f"| recipe | steps | tensors compared | tensors and pictures bit-identical to {args.base} | metadata |")
            print("|---|---|---|---|---|")
            for recipe in args.recipes:
                for name, code in (("base", old), ("now", REPO)):
                    run(code, recipe, root / recipe / name, args.steps, sdxl)
                compared, diffs = differences(root / recipe / "base", root / recipe / "now")
                meta = [d for d in diffs if ": metadata " in d]
                data = [d for d in diffs if d not in meta]
                changes = [c for m in meta for c in m.split(": metadata ", 1)[1].split(", ")]
                only_added = all(c.startswith("+dreambooth_dora.settings.") for c in changes)
                failed |= bool(data) or (bool(changes) and not (args.new_settings_ok and only_added))
                said = ", ".join(sorted(set(changes))) or "the same"
                print(f"| {recipe} | {args.steps} | {compared} | {'yes' if not data else 'NO: ' + ', '.join(data[:5])} "
                      f"| {said} |", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], capture_output=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
