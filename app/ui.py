"""The Gradio page: controls on top, one column per model (the base, then every loaded adapter,
checkpoint, merged pipeline or UI view), an X/Y grid, and the column manager. Results are one
HTML block that wraps on narrow screens; every picture enlarges on click. Every handler turns
errors into a message; the app keeps running."""

from __future__ import annotations

import base64
import html
import io
import random
import re

import gradio as gr
import numpy as np

from dreambooth_dora.families import family_of_pipeline

from .core import (RULES, AppError, Comparison, GridSpec, StoppedError, difference_map, find_adapters,
                   find_runs)

SCALE_HELP = ("Adapter scale multiplies the low-rank update. For DoRA, 0 is NOT the base model: the "
              "learned magnitudes still apply. The base column always runs with adapters off.")

CSS = """<style>
.dd-results { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 260px)); gap: 12px;
              align-items: start; }
.dd-col { margin: 0; min-width: 0; border: 1px solid #ddd; border-radius: 8px; padding: 6px;
          box-sizing: border-box; }
.dd-col figcaption { font-size: 13px; line-height: 1.3; margin-bottom: 4px; overflow-wrap: break-word; }
.dd-grid { overflow-x: auto; max-width: 100%; }
.dd-grid img { max-width: none; image-rendering: pixelated; display: block; }
.dd-col img.dd-cell { width: 100%; height: auto; image-rendering: pixelated; display: block; cursor: zoom-in; }
.dd-time { font-size: 12px; color: #555; }
.dd-zoom { display: none; }
.dd-zoom:target { display: flex; position: fixed; inset: 0; z-index: 1000; background: rgba(0,0,0,.85);
                  align-items: center; justify-content: center; cursor: zoom-out; }
.dd-zoom img { width: min(92vw, 92vh); height: auto; image-rendering: pixelated; }
</style>"""


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower() or "col"


def data_uri(im) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def breakable(text: str) -> str:
    """Escaped text that may wrap after a path separator (/ _ . -), never inside a word."""
    return re.sub(r"([/_.\-·])", r"\1<wbr>", html.escape(text))


def enlarged(im, at_least: int = 256):
    """`im` enlarged by a whole factor (nearest neighbour) to at least `at_least` px on its long
    side: a small model's 32 px picture at the size the result cards show it."""
    from PIL import Image

    k = max(1, -(-at_least // max(im.size)))
    return im if k == 1 else im.resize((im.width * k, im.height * k), Image.NEAREST)


def grid_html(picture) -> str:
    """The grid at its own pixel size in a box that scrolls sideways: its labels are never
    shrunk, and no badge lies over them."""
    return (f'{CSS}<div class="dd-grid"><img src="{data_uri(picture)}" width="{picture.width}" '
            f'height="{picture.height}" alt="X/Y grid"></div>')


def figure(key: str, title: str, caption: str, images: list, notes: list[str]) -> str:
    cells = []
    for i, (im, note) in enumerate(zip(images, notes)):
        src, zid = data_uri(im), f"zoom-{key}-{i}"
        cells.append(f'<a href="#{zid}"><img class="dd-cell" src="{src}" alt="{html.escape(title)} {i + 1}"></a>'
                     f'<div class="dd-time">{html.escape(note)}</div>'
                     f'<a class="dd-zoom" id="{zid}" href="#_"><img src="{src}" alt="enlarged"></a>')
    return (f'<figure class="dd-col" id="col-{key}" data-label="{html.escape(title)}"><figcaption>'
            f'<b>{breakable(title)}</b><br>{breakable(caption)}</figcaption>{"".join(cells)}</figure>')


def results_html(result: dict, captions: dict, diffs: dict) -> str:
    """One figure per column (captioned, every image with its time), and for each UI view the
    per-pixel difference to the exact column it shows."""
    parts = [CSS, '<div class="dd-results">']
    for label, images in result.items():
        parts.append(figure(slug(label), label, captions.get(label, ""), [im for im, _ in images],
                            [f"{t:.2f} s" for _, t in images]))
        if label in diffs:
            heat, top = diffs[label]
            parts.append(figure("diff-" + slug(label), f"|{label} − exact|",
                                "per pixel, black: equal", [heat], [f"largest difference {top} of 255"]))
    return "".join(parts + ["</div>"])


def parse_values(axis: str, text: str) -> list:
    if axis == "prompts":
        return [line.strip() for line in (text or "").splitlines() if line.strip()]
    items = [x for x in re.split(r"[,\s]+", text or "") if x]
    try:
        return [int(x) for x in items] if axis == "seeds" else [float(x) for x in items]
    except ValueError:
        raise AppError(f"{axis}: {text!r} is not a list of {'whole numbers' if axis == 'seeds' else 'numbers'}") \
            from None


class Pickers:
    """Every control that lists the columns, registered by name with the rule it follows when the
    columns change (a rule gets the column names and the adapter columns' names)."""

    RULES = {
        "all": lambda names, adapters: gr.update(choices=names, value=names),
        "last": lambda names, adapters: gr.update(choices=names, value=names[-1]),
        "first": lambda names, adapters: gr.update(choices=names, value=names[0]),
        "last adapter": lambda names, adapters: gr.update(choices=adapters, value=adapters[-1] if adapters else None),
        "removable": lambda names, adapters: gr.update(choices=[n for n in names if n != "base"], value=None),
    }

    def __init__(self, comp: Comparison):
        self.comp, self.widgets, self.rules = comp, {}, {}
        self.column_list = None  # the columns as text (set by the column manager)

    def add(self, name: str, widget, rule: str):
        self.widgets[name], self.rules[name] = widget, self.RULES[rule]
        return widget

    def updates(self) -> dict:
        """{widget: its update} for the columns as they are now."""
        names = list(self.comp.columns)
        adapters = [n for n, c in self.comp.columns.items() if c.kind == "adapter"]
        return {self.widgets[n]: rule(names, adapters) for n, rule in self.rules.items()}

    def unchanged(self) -> dict:
        return {w: gr.update() for w in self.widgets.values()}


def error_line(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def build_ui(comp: Comparison, desk=None) -> gr.Blocks:
    """The page: one builder per section; the column pickers follow the columns by name. With a
    `desk` (app/train_tab.py), a Train tab beside Compare."""
    with gr.Blocks(title="dreambooth-dora: compare adapters") as demo:
        pickers = Pickers(comp)
        with gr.Tabs(selected="compare", elem_id="tabs") as tabs:
            with gr.Tab("Compare", id="compare", elem_id="tab-compare") as compare_page:
                gr.Markdown("## Base and any adapters, checkpoints and UI views — same prompt, seed, initial latents "
                            "and scheduler for every column")
                ui = controls_section(comp, pickers)
                results_section(comp, pickers, ui)
                grid_section(comp, pickers, ui)
                columns_section(comp, pickers)
            if desk is not None:
                from .train_tab import train_tab

                with gr.Tab("Train", id="train", elem_id="tab-train") as train_page:
                    t = train_tab(desk)
                train_page.select(lambda: gr.Timer(active=True), outputs=t["timer"], queue=False)
                compare_page.select(lambda: gr.Timer(active=False), outputs=t["timer"], queue=False)
                compare_section(comp, pickers, ui, desk, t, tabs)
        # the columns live on the server: a new tab or a reload shows every column added since
        demo.load(lambda: {**pickers.updates(), pickers.column_list: column_text(comp)},
                  outputs=[*pickers.widgets.values(), pickers.column_list], queue=False)
    # one request at a time: the pipeline's active adapter is shared state
    demo.queue(default_concurrency_limit=1)
    return demo


def controls_section(comp: Comparison, pickers: Pickers) -> dict:
    """Prompt, seed, sampling and size controls, the shown columns, Generate and Stop."""
    size, labels = comp.native_size(), list(comp.columns)
    ui = {}
    with gr.Row():
        ui["prompt"] = gr.Textbox(label="Prompt", placeholder="a sks icon, 3d render", elem_id="prompt", scale=3,
                                  min_width=240)
        ui["negative"] = gr.Textbox(label="Negative prompt", elem_id="negative", scale=2, min_width=200)
    with gr.Row():
        ui["seed"] = gr.Number(label="Seed", value=0, precision=0, elem_id="seed", min_width=100)
        random_seed = gr.Button("Random seed", elem_id="random-seed", min_width=100)
        ui["steps"] = gr.Slider(1, 100, value=20, step=1, label="Steps", elem_id="steps", min_width=160)
        ui["guidance"] = gr.Slider(0.0, 20.0, value=family_of_pipeline(comp.pipe).default_guidance, step=0.5,
                                   label="Guidance", min_width=160)
        ui["scheduler"] = gr.Dropdown(list(comp.schedulers), value=next(iter(comp.schedulers)), label="Scheduler",
                                      min_width=140)
    with gr.Row():
        ui["width"] = gr.Slider(16, 2048, value=size, step=8, label="Width", min_width=160)
        ui["height"] = gr.Slider(16, 2048, value=size, step=8, label="Height", min_width=160)
        ui["scale"] = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Adapter scale", info=SCALE_HELP, min_width=160)
        ui["count"] = gr.Slider(1, 8, value=1, step=1, label="Images per column", min_width=160)
    ui["shown"] = pickers.add("shown", gr.CheckboxGroup(labels, value=labels, label="Columns", elem_id="shown"), "all")
    with gr.Row():
        ui["generate"] = gr.Button("Generate", variant="primary", elem_id="generate", scale=4)
        stop = gr.Button("Stop", variant="stop", elem_id="stop", scale=1)
    gr.Markdown(f"One request may ask for at most {comp.max_work:,} units of work (width x height x steps x "
                "images x columns; a grid: x cells); the server's `--max-work` raises it.", elem_id="work-limit")
    ui["status"] = gr.Markdown("", elem_id="status")
    stop_status = gr.Markdown("", elem_id="stop-status")

    def on_stop():
        # the running request or grid says "Stopped after step k of n" where its result goes;
        # here only the case where nothing ran
        return "" if comp.request_stop() else "Nothing was running."

    random_seed.click(lambda: random.randrange(2**31), outputs=ui["seed"])
    # outside the queue, so that it runs while a generation holds the queue: the running request
    # stops at its next sampling step and says so itself (Gradio's own cancel is not used: it
    # raced with that and showed a bare "Error"); requests waiting in the queue run after it
    stop.click(on_stop, outputs=stop_status, queue=False)
    return ui


SAMPLING = ("prompt", "negative", "seed", "steps", "guidance", "scheduler", "width", "height", "scale")


def results_section(comp: Comparison, pickers: Pickers, ui: dict) -> None:
    """One card per column, and the difference map of any two columns."""
    results = gr.HTML("", elem_id="results")
    labels = list(comp.columns)
    with gr.Row():
        diff_a = pickers.add("diff a", gr.Dropdown(labels, value=labels[-1], label="Difference: column A",
                                                   elem_id="diff-a"), "last")
        diff_b = pickers.add("diff b", gr.Dropdown(labels, value=labels[0], label="column B", elem_id="diff-b"),
                             "first")
        diff_button = gr.Button("Show |A − B| difference map", elem_id="diff")
    diff_image = gr.Image(label="|A − B| per pixel (black: equal), enlarged like the pictures above",
                          elem_id="diff-image", format="png", height=300)
    diff_status = gr.Markdown("", elem_id="diff-status")
    last = gr.State({})

    def on_generate(prompt, negative, seed, steps, guidance, scheduler, width, height, scale, count, shown):
        cols = [c for c in comp.columns if c in (shown or [])]
        try:
            result = comp.generate(prompt, negative, seed, steps, float(guidance), width, height,
                                   scheduler, float(scale), count, cols)
        except StoppedError as stopped:
            return (f"Stopped after step {stopped.step} of {stopped.steps} ({stopped.label} column): nothing of "
                    "this request is shown"), {}, gr.update()
        except AppError as err:
            return f"Error: {err}", {}, gr.update()
        except Exception as err:  # keep serving whatever went wrong
            return f"Error: generation failed: {error_line(err)}", {}, gr.update()
        msg = f"seed {int(seed)} · {scheduler} · {int(steps)} steps · {int(width)}×{int(height)}"
        keep = {s: [im for im, _ in v] for s, v in result.items()}
        return msg, keep, results_html(result, comp.captions(), comp.view_differences(result))

    def on_diff(keep, a, b):
        if not keep.get(a) or not keep.get(b):
            return None, f"Generate with both {a!r} and {b!r} shown first."
        top = np.abs(np.asarray(keep[a][0], dtype=np.int16) - np.asarray(keep[b][0], dtype=np.int16)).max()
        return (enlarged(difference_map(keep[a][0], keep[b][0])),
                f"|{a} − {b}|: largest per-pixel difference {top} of 255")

    ui["generate"].click(on_generate, inputs=[ui[k] for k in (*SAMPLING, "count", "shown")],
                         outputs=[ui["status"], last, results])
    diff_button.click(on_diff, inputs=[last, diff_a, diff_b], outputs=[diff_image, diff_status])


def grid_section(comp: Comparison, pickers: Pickers, ui: dict) -> None:
    """The X/Y grid: seeds, prompts or scales against columns or scales, drawn cell by cell."""
    labels = list(comp.columns)
    with gr.Accordion("X/Y grid: seeds, prompts or scales against columns or scales", open=True):
        with gr.Row():
            rows_axis = gr.Radio(["seeds", "prompts", "scales"], value="seeds", label="Rows", elem_id="grid-rows")
            row_values = gr.Textbox(value="0, 1, 2", label="Row values (seeds / scales: comma-separated; "
                                                            "prompts: one per line)", lines=2,
                                    elem_id="grid-row-values")
        with gr.Row():
            cols_axis = gr.Radio(["columns", "scales"], value="columns", label="Columns", elem_id="grid-cols")
            grid_pick = pickers.add("grid columns", gr.CheckboxGroup(labels, value=labels, label="Columns in the grid",
                                                                     elem_id="grid-pick"), "all")
        with gr.Row():
            grid_scales = gr.Textbox(value="0.5, 1.0, 1.5", label="Scales (when the columns are scales)",
                                     elem_id="grid-scales")
            grid_column = pickers.add("grid adapter", gr.Dropdown(labels, value=None, elem_id="grid-column",
                                                                  label="Adapter column drawn at each scale"),
                                      "last adapter")
        grid_cost = gr.Markdown("", elem_id="grid-cost")
        draw = gr.Button("Draw grid", variant="primary", elem_id="draw-grid")
        grid_progress = gr.Markdown("", elem_id="grid-progress")
        gr.Markdown("**Grid** (saved as PNG + JSON when complete; shown at its own size: scroll sideways)")
        grid_image = gr.HTML("", elem_id="grid-image")
        grid_files = gr.File(label="Saved grid", file_count="multiple", elem_id="grid-files")

    def spec_of(prompt, negative, seed, steps, guidance, scheduler, width, height, scale, rows, rvals, cols, pick,
                scales, column):
        return GridSpec(prompt=prompt, rows=rows, row_values=parse_values(rows, rvals), cols=cols,
                        col_values=[c for c in comp.columns if c in (pick or [])] if cols == "columns"
                        else parse_values("scales", scales), column=column, negative=negative or "",
                        seed=seed, steps=steps, guidance=float(guidance), width=width,
                        height=height, scheduler=scheduler, scale=float(scale))

    def on_cost(*args):
        try:
            return comp.grid_cost(spec_of(*args))
        except AppError as err:
            return f"Cannot draw: {err}"

    def on_grid(*args):
        done = total = 0
        try:
            spec = spec_of(*args)
            for done, total, picture in comp.draw_grid(spec):
                yield (f"drawing: {done} of {total} cells" if done < total else f"drew {total} cells; saving",
                       grid_html(picture), gr.update())
            png, js = comp.save_grid(spec, comp.last_grid[1])
            yield (f"Saved {png} and {js.name} (the settings that reproduce it)", grid_html(picture),
                   [str(png), str(js)])
        except StoppedError as stopped:
            yield (f"Stopped after {done} of {total} cells (cell {done + 1} at step {stopped.step} of "
                   f"{stopped.steps}): the cells drawn are shown, the rest grey; this grid is not saved",
                   gr.update(), gr.update())
        except AppError as err:
            yield f"Error: {err}", gr.update(), gr.update()
        except Exception as err:
            yield f"Error: the grid failed: {error_line(err)}", gr.update(), gr.update()

    grid_inputs = [*(ui[k] for k in SAMPLING), rows_axis, row_values, cols_axis, grid_pick, grid_scales, grid_column]
    draw.click(on_grid, inputs=grid_inputs, outputs=[grid_progress, grid_image, grid_files])
    for widget in grid_inputs:
        widget.change(on_cost, inputs=grid_inputs, outputs=grid_cost, queue=False)


def columns_section(comp: Comparison, pickers: Pickers) -> None:
    """The column manager: load adapters, merged pipelines, a run's checkpoints, UI views; remove."""
    labels = list(comp.columns)
    with gr.Accordion("Columns: load adapters, merged pipelines, a run's checkpoints, UI views", open=False):
        with gr.Row():
            found = gr.Dropdown(sorted(set(find_adapters(comp.root) + find_runs(comp.root))),
                                label="Found under the adapters root", allow_custom_value=False, elem_id="found")
            refresh = gr.Button("Refresh list", elem_id="refresh")
        path = gr.Textbox(label="…or a folder relative to the adapters root", elem_id="adapter-path")
        label = gr.Textbox(label="Column label (a run: the labels' prefix)", value="dora", elem_id="label")
        with gr.Row():
            load = gr.Button("Load as column", elem_id="load")
            load_run = gr.Button("Add the run's checkpoints as columns", elem_id="load-run")
        with gr.Row():
            view_source = pickers.add("view source", gr.Dropdown(labels, value=None, label="Adapter column",
                                                                 elem_id="view-source"), "last adapter")
            view_rule = gr.Radio(list(RULES.values()), value="ComfyUI", label="As this UI draws its export",
                                 elem_id="view-rule")
            add_view = gr.Button("Add UI view column", elem_id="add-view")
        with gr.Row():
            remove_pick = pickers.add("remove", gr.Dropdown(labels, value=None, label="Column to remove",
                                                            elem_id="remove-pick"), "removable")
            remove = gr.Button("Remove column", elem_id="remove")
        load_status = gr.Markdown("", elem_id="load-status")
        pickers.column_list = gr.Markdown(column_text(comp), elem_id="column-list")

    def guarded(action):
        try:
            return {load_status: f"OK: {action()}", **pickers.updates(), pickers.column_list: column_text(comp)}
        except AppError as err:
            message = f"Error: {err}"
        except Exception as err:
            message = f"Error: {error_line(err)}"
        return {load_status: message, **pickers.unchanged(), pickers.column_list: gr.update()}

    def target_of(found, path):
        return (path or "").strip() or (found or "")

    def on_view(source, rule):
        key = {v: k for k, v in RULES.items()}.get(rule, rule)
        return guarded(lambda: comp.add_view(source, key))

    managed = [load_status, *pickers.widgets.values(), pickers.column_list]
    load.click(lambda f, p, lbl: guarded(lambda: comp.load(lbl, target_of(f, p), from_ui=True)),
               inputs=[found, path, label], outputs=managed)
    load_run.click(lambda f, p, lbl: guarded(lambda: "added " + ", ".join(
        comp.add_run(target_of(f, p), lbl or None, from_ui=True))), inputs=[found, path, label], outputs=managed)
    add_view.click(on_view, inputs=[view_source, view_rule], outputs=managed)
    remove.click(lambda pick: guarded(lambda: comp.remove(pick)), inputs=remove_pick, outputs=managed)
    refresh.click(lambda: gr.update(choices=sorted(set(find_adapters(comp.root) + find_runs(comp.root)))),
                  outputs=found)


def compare_section(comp: Comparison, pickers: Pickers, ui: dict, desk, t: dict, tabs) -> None:
    """Train tab -> Compare: a finished job's adapters become columns, with its instance prompt
    and seed preset, and the page turns to Compare."""
    from .train_tab import open_in_compare

    def on_compare(job_id, checkpoints):
        try:
            loaded = open_in_compare(comp, desk, job_id or "", bool(checkpoints))
            job = desk.queue.get(job_id)
        except (AppError, ValueError) as err:
            return {t["settings_status"]: f"Error: {err}", **pickers.unchanged(), pickers.column_list: gr.update(),
                    ui["prompt"]: gr.update(), ui["seed"]: gr.update(), tabs: gr.update()}
        return {t["settings_status"]: "OK: " + "; ".join(loaded), **pickers.updates(),
                pickers.column_list: column_text(comp), ui["prompt"]: job.settings.get("instance_prompt", ""),
                ui["seed"]: job.settings.get("seed", 0), tabs: gr.Tabs(selected="compare")}

    t["compare"].click(on_compare, inputs=[t["job"], t["with_checkpoints"]],
                       outputs=[t["settings_status"], *pickers.widgets.values(), pickers.column_list, ui["prompt"],
                                ui["seed"], tabs])


def column_text(comp: Comparison) -> str:
    return "Columns now:\n" + "\n".join(f"- **{html.escape(label)}**: {html.escape(caption)}"
                                        for label, caption in comp.captions().items())
