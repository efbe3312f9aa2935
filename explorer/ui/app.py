"""Build the demo: layout, handlers, and the wiring between them (with an api_name each, so
`gradio_client` can drive every action)."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..app.workbench import AppSettings, Workbench
from .handlers import Handlers
from .layout import BRIDGE_JS, CSS, UI, build

MAX_UPLOAD = "32mb"  # a subnet JSON of a 70B model is ~30 MB written out; the workbench checks the exact bound


VIEW = ("plot", "status", "session", "compare", "card", "layers", "pick_box", "message")  # what showing a run changes
ACTION = ("card", "compare", "session", "action_status", "message")  # what an action on the pick changes

# api name -> (handler, inputs, outputs, event options). Each action lists only the components it changes and
# the page's one message; a job's progress is drawn on one component, so the rest of the page (the plot too)
# stays visible and usable. Tests read the outputs from here.
ENDPOINTS: dict[str, tuple[str, tuple, tuple, dict]] = {
    "load_model": ("load", ("model_box", "dtype", "device", "session"), ("model_info", "session", "message"),
                   dict(concurrency_limit=None, show_progress_on="model_info")),
    "search": ("search", ("targets", "preset", "population", "generations", "minutes", "fitness_windows",
                          "fitness_mode", "space", "seed", "run_name",
                          "baselines", "x_axis", "y_axis", "session"), (*VIEW, "runs"),
               dict(concurrency_limit=None, show_progress="hidden")),
    # Stop cancels whichever heavy job this tab runs; queued (so its toast reaches the page) but without a
    # concurrency limit, so it never waits behind the job it stops. The name is from before it did more.
    "stop_search": ("stop", ("session",), ("status", "action_status", "message"),
                    dict(concurrency_limit=None, show_progress="hidden")),
    "open_run": ("open", ("runs", "x_axis", "y_axis", "session"), VIEW, dict(show_progress_on="plot")),
    "pick": ("pick", ("pick_box", "x_axis", "y_axis", "session"), ("card", "layers", "plot", "session", "pick_box",
                                                                     "message"), dict(show_progress_on="card")),
    "open_subnet": ("open_subnet", ("subnet_file", "x_axis", "y_axis", "session"), (*VIEW, "runs"),
                    dict(concurrency_limit=None, show_progress_on="card")),
    "reform": ("reform", ("session",), ACTION, dict(concurrency_limit=None, show_progress_on="action_status")),
    "measure_latency": ("measure", ("session",), ACTION, dict(concurrency_limit=None,
                                                                 show_progress_on="action_status")),
    "evaluate": ("evaluate", ("eval_tasks", "eval_limit", "session"), ACTION,
                 dict(concurrency_limit=None, show_progress_on="action_status")),
    "add_compare": ("add_compare", ("x_axis", "y_axis", "session"), ("compare", "plot", "session", "action_status",
                                                                       "message"), dict(show_progress="hidden")),
    "export": ("export", ("export_format", "session"), ("download", "action_status", "message"),
               dict(concurrency_limit=None, show_progress_on="action_status")),
    "report": ("report", ("session",), ("report_file", "action_status", "message"),
               dict(show_progress_on="report_file")),
    "generate": ("generate", ("prompt", "sample", "temperature", "top_p", "gen_seed", "max_tokens", "session"),
                 ("out_original", "out_a", "out_b", "session", "message"),
                 dict(concurrency_limit=None, show_progress="hidden")),
}
TRIGGERS = {"load_model": "load_btn.click", "search": "start_btn.click", "stop_search": "stop_btn.click",
            "open_run": "open_btn.click", "pick": "pick_btn.click", "open_subnet": "subnet_file.upload",
            "reform": "reform_btn.click", "measure_latency": "measure_btn.click", "evaluate": "eval_btn.click",
            "add_compare": "compare_btn.click", "export": "export_btn.click", "report": "report_btn.click",
            "generate": "gen_btn.click"}


def client_outputs(api_name: str) -> list[str]:
    """The outputs an API client receives from an endpoint, in order (gr.State is not sent)."""
    return [o for o in ENDPOINTS[api_name][2] if o != "session"]


def wire(ui: UI, h: Handlers) -> None:
    u = ui.__dict__

    def bind(event, api_name, handler, inputs, outputs, options, visible=True):
        opts = dict(options)
        if "show_progress_on" in opts:
            opts["show_progress_on"] = [u[opts["show_progress_on"]]]
        event(getattr(h, handler), [u[i] for i in inputs], [u[o] for o in outputs],
              api_name=api_name if visible else False, **opts)

    for api_name, (handler, inputs, outputs, options) in ENDPOINTS.items():
        component, event = TRIGGERS[api_name].split(".")
        bind(getattr(u[component], event), api_name, handler, inputs, outputs, options)
    pick = ENDPOINTS["pick"]
    bind(ui.pick_box.submit, "pick", *pick[:3], {**pick[3]}, visible=False)  # Enter in the id box
    bind(ui.pick_bridge_btn.click, "pick", "pick", ("pick_bridge", *pick[1][1:]), pick[2],
         dict(show_progress="hidden"), visible=False)  # a click on the plot, through the hidden bridge
    for axis in (ui.x_axis, ui.y_axis):
        axis.change(h.replot, [ui.x_axis, ui.y_axis, ui.session], [ui.plot, ui.message], api_name=False)
    ui.demo.load(h.start_page, [ui.x_axis, ui.y_axis, ui.session], [u[o] for o in (*VIEW, "runs")], api_name=False)


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
