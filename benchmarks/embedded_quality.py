"""How well the embedded toy-world model draws, and what the quick start's adapters learned.

    python benchmarks/embedded_quality.py                       # base model on 64 held-out prompts
    python benchmarks/embedded_quality.py --base embedded:toy-world-flux   # the FLUX.1-architecture model
    python benchmarks/embedded_quality.py --base embedded:toy-world-flux --grid docs/toy_world_flux.png  # + a picture
    python benchmarks/embedded_quality.py --dora outputs/quickstart_tiny_icon_dora --lora outputs/quickstart_tiny_icon_lora

Judged by the classifier shipped beside the model (no human): class and colour agreement with
the prompt; subject fidelity as the cosine distance of the classifier's penultimate features
to the instance images (lower is nearer), and whether the class prompt still draws its class.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dreambooth_dora.training.data import load_image_folder  # noqa: E402
from dreambooth_dora.toy.embedded import draw_prompts, score_base, subject_distance  # noqa: E402
from dreambooth_dora.adapters.file import load_adapter  # noqa: E402
from dreambooth_dora.families.models import load_pipeline, resolve_model  # noqa: E402
from dreambooth_dora.toy.world import CLASSES, classify, load_classifier  # noqa: E402


def write_grid(pipe, classifier, path: str, guidance=None, n: int = 16, seeds=(0, 1)) -> None:
    """The first `n` held-out prompts, one row each (a column per seed), captioned with what the
    classifier saw in each picture (class, colour; upper case where it disagrees with the prompt)."""
    from dreambooth_dora.outputs import atomic_path
    from dreambooth_dora.toy.world import COLOURS, held_out_prompts
    from dreambooth_dora.training.validation import image_grid

    prompts = held_out_prompts()[:n]
    columns = [draw_prompts(pipe, [p for p, *_ in prompts], seed, guidance=guidance) for seed in seeds]
    colours = list(COLOURS)
    labels = []
    for i, (prompt, c, k, _) in enumerate(prompts):
        seen = []
        for images in columns:
            cls, colour, _ = classify(classifier, [images[i]])
            seen.append(" ".join(w if ok else w.upper() for w, ok in ((CLASSES[cls[0]], cls[0] == c),
                                                                      (colours[colour[0]], colour[0] == k))))
        labels.append(f"{prompt} -> {' | '.join(seen)}")
    grid = image_grid([[images[i] for images in columns] for i in range(n)], labels,
                      [f"seed {s}" for s in seeds], min_cell=128)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="embedded:toy-world")
    parser.add_argument("--dora")
    parser.add_argument("--lora")
    parser.add_argument("--instance-dir", default="sample_data/3d_icon")
    parser.add_argument("--prompt", default="a sks icon, 3d render")
    parser.add_argument("--class-prompt", default="a orange square icon")
    parser.add_argument("--class-name", default="square icon")
    parser.add_argument("--grid", metavar="FILE.png", help="also draw the first 16 held-out prompts (2 seeds) with "
                                                            "the classifier's verdict into this new picture")
    parser.add_argument("--guidance", type=float, help="CFG's scale (default 5), or the guidance a model with guidance "
                                                       "built in is told (default its family's: 3.5 for FLUX.1)")
    args = parser.parse_args(argv)
    problem = None
    try:
        base = resolve_model(args.base)
    except ValueError as err:
        problem = f"--base: {err}"
    else:
        if not (Path(base) / "classifier" / "model.safetensors").is_file():
            problem = f"--base: {args.base} has no classifier/ (the embedded toy-world models have one)"
    if args.grid and (Path(args.grid).exists() or not args.grid.endswith(".png")):
        problem = problem or f"--grid: give a new .png file ({args.grid} exists or is not one)"
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        problem = problem or f"--guidance must be a finite number >= 0, got {args.guidance}"
    for flag, path in (("--dora", args.dora), ("--lora", args.lora)):
        if path and not Path(path).exists():
            problem = problem or f"{flag}: no adapter at {path}"
    if (args.dora or args.lora) and not Path(args.instance_dir).is_dir():
        problem = problem or f"--instance-dir: no folder {args.instance_dir}"
    if args.class_name not in CLASSES:
        problem = problem or f"--class-name: one of {', '.join(CLASSES)}, got {args.class_name!r}"
    if problem:  # one line, before any model loads
        print(f"error: {problem}", file=sys.stderr)
        return 2
    classifier = load_classifier(Path(base) / "classifier")

    def pipe_with(path=None):
        pipe = load_pipeline(base)
        if path:
            load_adapter(pipe, path, adapter_name="adapter")
        return pipe

    if not (args.dora or args.lora):
        c, k = score_base(pipe_with(), classifier, seeds=(0, 1), guidance=args.guidance)
        print(f"base on 64 held-out prompts x 2 seeds: class agreement {c:.1%}, colour agreement {k:.1%}")
        if args.grid:
            write_grid(pipe_with(), classifier, args.grid, args.guidance)
            print(f"wrote {args.grid}")
        return 0
    instances = [e.image for e in load_image_folder(args.instance_dir)]
    print("| model | subject distance (lower = nearer) | class prompt draws its class |")
    print("|---|---|---|")
    for name, path in (("base", None), ("DoRA", args.dora), ("LoRA", args.lora)):
        if name != "base" and not path:
            continue
        pipe = pipe_with(path)
        d = subject_distance(pipe, classifier, instances, args.prompt, guidance=args.guidance)
        images = draw_prompts(pipe, [args.class_prompt] * 8, seed=0, guidance=args.guidance)
        cls, _, _ = classify(classifier, images)
        hits = sum(CLASSES[i] == args.class_name for i in cls)
        print(f"| {name} | {d:.3f} | {hits}/8 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
