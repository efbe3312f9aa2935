"""Build the demo: layout, handlers, and the wiring between them (with an api_name each, so
`gradio_client` can drive every action)."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..app.workbench import AppSettings, Workbench
from .handlers import Handlers
from .layout import BRIDGE_JS, CSS, UI, build

MAX_UPLOAD = "32mb"  # a subnet JSON of a 70B model is ~30 MB written out; the workbench checks the exact bound


VIEW = ("plot", "status", "session", "compare", "card", "layers", "pick_box", "size", "size_readout")  # what showing a run changes
ACTION = ("card", "compare", "session", "action_status")  # what an action on the pick changes

# api name -> (handler, inputs, outputs, event options). Each action lists only the components it changes; its
# answers and its failures go to its own section's status line (MESSAGE_OF), and a job's progress is drawn there
# too, so the rest of the page (the plot too) stays visible and usable. Tests read the outputs from here.
ENDPOINTS: dict[str, tuple[str, tuple, tuple, dict]] = {
    "load_model": ("load", ("model_box", "dtype", "device", "session"), ("model_info", "session"),
                   dict(concurrency_limit=None, show_progress_on="model_info")),
    "search": ("search", ("targets", "share", "preset", "population", "generations", "minutes", "fitness_windows",
                          "fitness_mode", "space", "seed", "run_name",
                          "baselines", "x_axis", "y_axis", "compensate", "session"), (*VIEW, "runs", "start_btn"),
               dict(concurrency_limit=None, show_progress="hidden")),
    # Stop cancels whichever heavy job this tab runs; queued (so its answer reaches the page) but without a
    # concurrency limit, so it never waits behind the job it stops. The name is from before it did more.
    "stop_search": ("stop", ("session",), ("status", "action_status", "export_status"),
                    dict(concurrency_limit=None, show_progress="hidden")),
    "open_run": ("open", ("runs", "x_axis", "y_axis", "session"), VIEW, dict(show_progress_on="plot")),
    "pick": ("pick", ("pick_box", "x_axis", "y_axis", "session"), ("card", "layers", "plot", "session", "pick_box",
                                                                     "pick_status"), dict(show_progress_on="card")),
    # the size slider's release: the library's subnet at that size, evaluated, stored and picked (its drag only
    # previews, with no API name); the last release wins
    "pick_size": ("pick_size", ("size", "x_axis", "y_axis", "session"),
                  ("card", "layers", "plot", "session", "pick_box", "pick_status", "size_readout"),
                  dict(concurrency_limit=None, show_progress_on="size_readout", trigger_mode="always_last")),
    "open_subnet": ("open_subnet", ("subnet_file", "x_axis", "y_axis", "session"),
                    ("card", "layers", "plot", "session", "pick_box", "compare", "pick_status"),
                    dict(concurrency_limit=None, show_progress_on="pick_status")),
    "reform": ("reform", ("reform_intercept", "session"), ACTION, dict(concurrency_limit=None, show_progress_on="action_status")),
    "measure_latency": ("measure", ("session",), ACTION, dict(concurrency_limit=None,
                                                                 show_progress_on="action_status")),
    "evaluate": ("evaluate", ("eval_tasks", "eval_limit", "x_axis", "y_axis", "session"), (*ACTION, "plot"),
                 dict(concurrency_limit=None, show_progress_on="action_status")),
    "add_compare": ("add_compare", ("x_axis", "y_axis", "session"), ("compare", "plot", "session", "action_status"),
                    dict(show_progress="hidden")),
    "export": ("export", ("export_format", "session"), ("download", "export_status"),
               dict(concurrency_limit=None, show_progress_on="export_status")),
    "report": ("report", ("session",), ("report_file", "export_status"), dict(show_progress_on="report_file")),
    "generate": ("generate", ("prompt", "sample", "temperature", "top_p", "gen_seed", "max_tokens", "session"),
                 ("out_original", "out_a", "out_b", "session", "gen_status"),
                 dict(concurrency_limit=None, show_progress="hidden")),
}
# where each endpoint's answer (and its failure) is written: the status line of the section it acts in
MESSAGE_OF = {"load_model": "model_info", "search": "status", "stop_search": "status", "open_run": "status",
              "pick": "pick_status", "pick_size": "pick_status", "open_subnet": "pick_status",
              "reform": "action_status", "measure_latency": "action_status", "evaluate": "action_status",
              "add_compare": "action_status", "export": "export_status", "report": "export_status",
              "generate": "gen_status"}
TRIGGERS = {"load_model": "load_btn.click", "search": "start_btn.click", "stop_search": "stop_btn.click",
            "open_run": "open_btn.click", "pick": "pick_btn.click", "pick_size": "size.release",
            "open_subnet": "subnet_file.upload", "reform": "reform_btn.click", "measure_latency": "measure_btn.click",
            "evaluate": "eval_btn.click", "add_compare": "compare_btn.click", "export": "export_btn.click",
            "report": "report_btn.click", "generate": "gen_btn.click"}


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
         dict(show_progress="hidden", trigger_mode="always_last"), visible=False)  # a plot click; the last one wins
    # dragging the size slider: the library's subnet in the card, solved per step (`input` fires on the user's
    # moves only, not on the server's updates of the slider); the last position wins, and nothing is stored.
    # Unpreprocessed: a number half typed in the slider's box is skipped by the handler, not refused by Gradio.
    ui.size.input(h.size_preview, [ui.size, ui.pick_status, ui.session],
                  [ui.card, ui.layers, ui.pick_status, ui.size_readout],
                  api_name=False, show_progress="hidden", trigger_mode="always_last", preprocess=False)
    for axis in (ui.x_axis, ui.y_axis):
        axis.change(h.replot, [ui.x_axis, ui.y_axis, ui.session], [ui.plot, ui.pick_status], api_name=False)
    ui.demo.load(h.start_page, [ui.x_axis, ui.y_axis, ui.session], [u[o] for o in (*VIEW, "runs")], api_name=False)
    stop = ENDPOINTS["stop_search"]
    for button in (ui.stop_pick_btn, ui.stop_export_btn):  # Stop beside every long action; one job per tab
        bind(button.click, "stop_search", *stop[:3], stop[3], visible=False)


def create_app(runs_root: Path, exports_root: Path, settings: AppSettings = AppSettings(),
               default_model: str = "default") -> tuple[gr.Blocks, Workbench]:
    wb = Workbench(runs_root, exports_root, settings)
    ui = build(settings.file_cache, default_model)
    with ui.demo:
        wire(ui, Handlers(ui, wb))
    ui.demo.queue(default_concurrency_limit=4)
    return ui.demo, wb


def launch_kwargs(wb: Workbench) -> dict:
    return {"css": CSS, "js": BRIDGE_JS, "allowed_paths": [str(wb.exports_root)], "theme": gr.themes.Soft(),
            "footer_links": ["api"], "show_error": True,
            "max_file_size": MAX_UPLOAD}  # the only upload is a subnet JSON; Gradio refuses bigger bodies


__all__ = ["create_app", "launch_kwargs"]
