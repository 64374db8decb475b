"""The Gradio page: controls on top, one column per model (base | LoRA | DoRA), a difference map
on demand, and adapter loading. Every handler turns errors into a message; the app keeps running."""

from __future__ import annotations

import random

import gradio as gr

from .core import SCHEDULERS, SLOTS, AppError, Comparison, difference_map, find_adapters

SCALE_HELP = ("Adapter scale multiplies the low-rank update. For DoRA, 0 is NOT the base model: the "
              "learned magnitudes still apply. The base column always runs with adapters off.")
TITLES = {"base": "Base", "lora": "LoRA", "dora": "DoRA"}


def build_ui(comp: Comparison) -> gr.Blocks:
    size = comp.pipe.unet.config.sample_size * comp.pipe.vae_scale_factor
    with gr.Blocks(title="dreambooth-dora: base | LoRA | DoRA") as demo:
        gr.Markdown("## Base | LoRA | DoRA — same prompt, seed, initial latents and scheduler for every column")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", placeholder="a sks icon, 3d render", elem_id="prompt", scale=3)
            negative = gr.Textbox(label="Negative prompt", elem_id="negative", scale=2)
        with gr.Row():
            seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
            random_seed = gr.Button("Random seed", elem_id="random-seed")
            steps = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="steps")
            guidance = gr.Slider(0.0, 20.0, value=7.5, step=0.5, label="Guidance")
            scheduler = gr.Dropdown(list(SCHEDULERS), value="DPM++ 2M", label="Scheduler")
        with gr.Row():
            width = gr.Slider(16, 2048, value=size, step=8, label="Width")
            height = gr.Slider(16, 2048, value=size, step=8, label="Height")
            scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Adapter scale", info=SCALE_HELP)
            count = gr.Slider(1, 8, value=1, step=1, label="Images per column")
            shown = gr.CheckboxGroup([TITLES[s] for s in SLOTS], value=[TITLES[s] for s in SLOTS], label="Columns")
        with gr.Row():
            generate = gr.Button("Generate", variant="primary", elem_id="generate", scale=4)
            stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
        gr.Markdown(f"One request may ask for at most {comp.max_work:,} units of work (width x height x steps x "
                    "images x columns); the server's `--max-work` raises it.", elem_id="work-limit")
        status = gr.Markdown("", elem_id="status")
        stop_status = gr.Markdown("", elem_id="stop-status")
        galleries, times = {}, {}
        with gr.Row():
            for slot in SLOTS:
                with gr.Column():
                    galleries[slot] = gr.Gallery(label=comp.captions()[slot], columns=2, height="auto",
                                                 elem_id=f"gallery-{slot}", format="png")
                    times[slot] = gr.Markdown("", elem_id=f"time-{slot}")
        with gr.Row():
            diff_button = gr.Button("Show |DoRA − LoRA| difference map", elem_id="diff")
            diff_image = gr.Image(label="|DoRA − LoRA| per pixel (black: equal)", elem_id="diff-image", format="png")
        with gr.Accordion("Load another adapter or merged pipeline", open=False):
            with gr.Row():
                found = gr.Dropdown(find_adapters(comp.root), label="Found under the adapters root",
                                    allow_custom_value=False, elem_id="found")
                refresh = gr.Button("Refresh list", elem_id="refresh")
            path = gr.Textbox(label="…or a folder relative to the adapters root", elem_id="adapter-path")
            slot_choice = gr.Radio(["lora", "dora"], value="dora", label="Into column", elem_id="slot")
            load = gr.Button("Load", elem_id="load")
            load_status = gr.Markdown("", elem_id="load-status")
        last = gr.State({})

        def on_random():
            return random.randrange(2**31)

        def on_generate(prompt, negative, seed, steps, guidance, scheduler, width, height, scale, count, shown):
            cols = [s for s in SLOTS if TITLES[s] in shown]
            empty = [gr.update()] * (2 * len(SLOTS))
            try:
                result = comp.generate(prompt, negative, int(seed), int(steps), float(guidance), int(width), int(height),
                                       scheduler, float(scale), int(count), cols)
            except AppError as err:
                return [f"Error: {err}", {}, *empty]
            except Exception as err:  # keep serving whatever went wrong
                return [f"Error: generation failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                        {}, *empty]
            updates = []
            for slot in SLOTS:
                images = result.get(slot, [])
                updates.append(gr.update(value=[(im, f"{t:.2f} s") for im, t in images],
                                         label=comp.captions()[slot], visible=slot in cols))
            for slot in SLOTS:
                images = result.get(slot, [])
                updates.append(f"{len(images)} image(s), {images[0][1]:.2f} s each" if images else "")
            msg = f"seed {int(seed)} · {scheduler} · {int(steps)} steps · {int(width)}×{int(height)}"
            keep = {s: [im for im, _ in v] for s, v in result.items()}
            return [msg, keep, *updates]

        def on_diff(keep):
            if not keep.get("dora") or not keep.get("lora"):
                return None, "Error: generate with both a LoRA and a DoRA column first"
            a, b = keep["dora"][0], keep["lora"][0]
            import numpy as np

            top = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()
            return difference_map(a, b), f"largest per-pixel difference: {top} of 255"

        def on_load(found, path, slot):
            target = (path or "").strip() or (found or "")
            try:
                msg = comp.load(slot, target, from_ui=True)
            except AppError as err:
                return f"Error: {err}", gr.update(), gr.update()
            except Exception as err:
                return f"Error: could not load {target!r}: {type(err).__name__}", gr.update(), gr.update()
            return f"OK: {msg}", gr.update(label=comp.captions()["lora"]), gr.update(label=comp.captions()["dora"])

        def on_stop():
            running = comp.request_stop()
            return ("Stopped: the running request ends after its current sampling step; nothing of it is shown"
                    if running else "Stopped: nothing was running")

        random_seed.click(on_random, outputs=seed)
        run = generate.click(on_generate,
                       inputs=[prompt, negative, seed, steps, guidance, scheduler, width, height, scale, count, shown],
                       outputs=[status, last, *[galleries[s] for s in SLOTS], *[times[s] for s in SLOTS]])
        # outside the queue, so that it runs while a generation holds the queue; a request still
        # waiting in the queue is cancelled there, a running one stops at its next sampling step
        stop.click(on_stop, outputs=stop_status, queue=False, cancels=[run])
        diff_button.click(on_diff, inputs=last, outputs=[diff_image, status])
        refresh.click(lambda: gr.update(choices=find_adapters(comp.root)), outputs=found)
        load.click(on_load, inputs=[found, path, slot_choice], outputs=[load_status, galleries["lora"], galleries["dora"]])
    # one request at a time: the pipeline's active adapter is shared state
    demo.queue(default_concurrency_limit=1)
    return demo
