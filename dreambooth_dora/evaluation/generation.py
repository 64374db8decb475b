"""The pictures an evaluation compares: which adapters (labelled), and every model's pictures of
every prompt and seed from the same initial latents."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters.file import AdapterFile, read_adapter
from .config import EvalConfig
from .drawing import draw, seeded_latents


def parse_sources(entries: list[str]) -> list[tuple[str, Path, AdapterFile]]:
    """[(label, path, adapter)]: `label=path` or a path labelled by method and rank ('DoRA r8')."""
    out = []
    for entry in entries:
        label, eq, path = entry.partition("=")
        if not eq:
            label, path = "", entry
        adapter = read_adapter(path)  # a clear error for a missing or non-adapter path
        if not label:
            label = f"{'DoRA' if adapter.use_dora else 'LoRA'} r{adapter.rank_alpha(adapter.main_prefix)[0]}"
        out.append((label, Path(path), adapter))
    labels = [lbl for lbl, _, _ in out]
    # same method and rank twice: tell them apart by folder name
    return [(f"{lbl} ({p.name})" if labels.count(lbl) > 1 else lbl, p, a) for lbl, p, a in out]


@torch.no_grad()
def generate(pipe, names: list[str], prompts: list[tuple[str, str]], cfg: EvalConfig, size: int,
             progress: bool = True, tokens: list[dict] | None = None) -> dict:
    """{model: {(prompt index, seed): [images]}}; model 'base' runs with every adapter disabled,
    adapter i alone as `adapter<i>`. Each (prompt, seed) starts from the same latents for all.
    `tokens[m]`: model m's new tokens (pivotal tuning), written where its prompts name the identifier."""
    out = {}
    bar = tqdm(total=len(names) * len(prompts) * len(cfg.seeds), desc="generating", disable=not progress)
    for m, name in enumerate(names):
        out[name] = {}
        for j, (_, prompt) in enumerate(prompts):
            for seed in cfg.seeds:
                latents, gens = seeded_latents(pipe, [seed], cfg.images_per_prompt, size, size)
                out[name][(j, seed)] = draw(pipe, None if m == 0 else f"adapter{m - 1}", prompt, latents, gens[0],
                                            tokens=tokens[m] if tokens else None,
                                            num_inference_steps=cfg.num_inference_steps,
                                            guidance_scale=cfg.guidance_scale, width=size, height=size)
                bar.update(1)
    bar.close()
    return out
