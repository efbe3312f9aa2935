"""Build the demo: layout, handlers, and the wiring between them (with an api_name each, so
`gradio_client` can drive every action)."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..workbench import AppSettings, Workbench
from .handlers import Handlers
from .layout import BRIDGE_JS, CSS, UI, build

MAX_UPLOAD = "32mb"  # a subnet JSON of a 70B model is ~30 MB written out; the workbench checks the exact bound


def wire(ui: UI, h: Handlers) -> None:
    u = ui
    every = lambda: [u.model_info, u.status, u.plot, u.card, u.layers, u.action_status, u.runs, u.session,  # noqa
                     u.pick_box, u.download, u.compare, u.out_original, u.out_a, u.out_b]
    u.load_btn.click(h.load, [u.model_box, u.dtype, u.device, u.session], every(), api_name="load_model",
                     concurrency_limit=None)
    u.start_btn.click(
        h.search, [u.targets, u.preset, u.population, u.generations, u.fitness_windows, u.seed, u.run_name,
                   u.baselines, u.x_axis, u.y_axis, u.session], every(), api_name="search", concurrency_limit=None)
    # Stop cancels whichever heavy job this tab runs (search, reformation, export, evaluation); the name
    # stays "stop_search" for API users from before it did more. Queued (so its "nothing is running"
    # toast reaches the page) but without a concurrency limit, so it never waits behind the job it stops.
    u.stop_btn.click(h.stop, [u.session], every(), api_name="stop_search", concurrency_limit=None,
                     show_progress="hidden")
    u.open_btn.click(h.open, [u.runs, u.x_axis, u.y_axis, u.session], every(), api_name="open_run")
    u.x_axis.change(h.replot, [u.x_axis, u.y_axis, u.session], every(), api_name=False)
    u.y_axis.change(h.replot, [u.x_axis, u.y_axis, u.session], every(), api_name=False)
    u.pick_bridge_btn.click(h.pick, [u.pick_bridge, u.x_axis, u.y_axis, u.session], every(), api_name=False)
    u.pick_btn.click(h.pick, [u.pick_box, u.x_axis, u.y_axis, u.session], every(), api_name="pick")
    u.pick_box.submit(h.pick, [u.pick_box, u.x_axis, u.y_axis, u.session], every(), api_name=False)
    u.subnet_file.upload(h.open_subnet, [u.subnet_file, u.x_axis, u.y_axis, u.session], every(),
                         api_name="open_subnet", concurrency_limit=None)
    u.reform_btn.click(h.reform, [u.session], every(), api_name="reform", concurrency_limit=None)
    u.measure_btn.click(h.measure, [u.session], every(), api_name="measure_latency", concurrency_limit=None)
    u.eval_btn.click(h.evaluate, [u.eval_tasks, u.eval_limit, u.session], every(), api_name="evaluate",
                     concurrency_limit=None)
    u.compare_btn.click(h.add_compare, [u.session], every(), api_name="add_compare")
    u.export_btn.click(h.export, [u.session], every(), api_name="export", concurrency_limit=None)
    u.gen_btn.click(h.generate, [u.prompt, u.sample, u.temperature, u.top_p, u.gen_seed,
                                 u.max_tokens, u.session], every(), api_name="generate", concurrency_limit=None)
    u.demo.load(h.start_page, [u.x_axis, u.y_axis, u.session], every(), api_name=False)


def create_app(runs_root: Path, exports_root: Path, settings: AppSettings = AppSettings(),
               default_model: str = "default") -> tuple[gr.Blocks, Workbench]:
    wb = Workbench(runs_root, exports_root, settings)
    ui = build(default_model)
    with ui.demo:
        wire(ui, Handlers(ui, wb))
    ui.demo.queue(default_concurrency_limit=4)
    return ui.demo, wb


def launch_kwargs(wb: Workbench) -> dict:
    return {"css": CSS, "js": BRIDGE_JS, "allowed_paths": [str(wb.exports_root)], "theme": gr.themes.Soft(),
            "footer_links": ["api"], "show_error": True,
            "max_file_size": MAX_UPLOAD}  # the only upload is a subnet JSON; Gradio refuses bigger bodies


__all__ = ["create_app", "launch_kwargs"]
