"""The page's components (build) — wiring lives in `handlers.py`."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ..app.plots import X_AXES, Y_AXES
from ..app.workbench import AppSettings
from ..model.generation import DecodeSettings
from ..pick.evaluation import DEFAULT_TASKS
from ..settings import PRESETS, ModelSettings, SearchSettings
from .session import Session
from .views import NO_PICK, compare_frame

APP_EVAL_LIMIT = AppSettings.eval_limit  # questions per task when evaluating from the page

INTRO = """# Subnet Explorer
Make a language model smaller and faster **without training**: search for subnets that inherit its weights
(narrower attention heads, fewer MLP channels, optionally fewer layers), see the quality–latency trade-off, pick a
point, recalibrate it, talk to it next to the original, and download it as a real, smaller model."""

CSS = """
.hidden-bridge { display: none !important; }
#status-box { min-height: 6em; }
#status-box table td, #status-box table th { white-space: nowrap; word-break: keep-all; }
#message:not(:empty) p { background: #fff4e5; border-left: 4px solid #e8590c; padding: 0.5em 0.8em; margin: 0; }
#subnet-file { min-height: 7.5em; }
.gen-box textarea { font-size: 0.95em; }
"""

# Plotly's click event -> the hidden pick box -> the server. gr.Plot has no select event.
BRIDGE_JS = """
() => {
  const topMarker = (plot, e) => {
    if (!e || !plot.data) return null;
    const traces = plot.querySelectorAll('.scatterlayer .trace');
    for (let i = traces.length - 1; i >= 0; i--) {  // the last trace drawn is on top
      const cd = plot.data[i] && plot.data[i].customdata;
      if (!cd || plot.data[i].meta === 'overlay') continue;  // rings around a point, not points
      const pts = traces[i].querySelectorAll('.point');
      let best = null, bestD = Infinity;  // of this trace's markers under the cursor, the nearest centre
      for (let k = 0; k < pts.length; k++) {
        const r = pts[k].getBoundingClientRect();
        if (!r.width || !cd[k] || e.clientX < r.left - 1 || e.clientX > r.right + 1 || e.clientY < r.top - 1
            || e.clientY > r.bottom + 1) continue;
        const d = Math.hypot(r.left + r.width / 2 - e.clientX, r.top + r.height / 2 - e.clientY);
        if (d < bestD) { bestD = d; best = String(Array.isArray(cd[k]) ? cd[k][0] : cd[k]); }
      }
      if (best) return best;
    }
    return null;
  };
  const attach = () => {
    const plot = document.querySelector('#pareto-plot .js-plotly-plot');
    if (plot && plot.on && !plot.__subnetBridge) {
      plot.__subnetBridge = true;
      plot.on('plotly_click', (ev) => {
        const pt = ev && ev.points && ev.points[0];
        // Plotly hands over the point it hovers, which prefers the smallest marker under the cursor
        // (a faint dominated point under a front marker); pick the marker drawn on top instead.
        const id = topMarker(plot, ev && ev.event) ||
          (pt && pt.customdata ? (Array.isArray(pt.customdata) ? pt.customdata[0] : pt.customdata) : null);
        if (!id) return;
        const box = document.querySelector('#pick-bridge textarea, #pick-bridge input');
        if (!box) return;
        box.value = String(id);
        box.dispatchEvent(new Event('input', { bubbles: true }));
        const btn = document.querySelector('#pick-bridge-btn');
        if (btn) setTimeout(() => btn.click(), 50);
      });
    }
  };
  setInterval(attach, 500);
}
"""


@dataclass
class UI:
    """Every component the handlers read or write, by name."""

    demo: gr.Blocks
    session: gr.State
    message: gr.Markdown  # the one place every failure is reported
    # model
    model_box: gr.Textbox
    dtype: gr.Dropdown
    device: gr.Dropdown
    load_btn: gr.Button
    model_info: gr.Markdown
    # search
    targets: gr.Textbox
    preset: gr.Radio
    population: gr.Textbox
    minutes: gr.Textbox
    fitness_mode: gr.Radio
    space: gr.Radio
    generations: gr.Textbox
    fitness_windows: gr.Textbox
    seed: gr.Number
    run_name: gr.Textbox
    baselines: gr.Checkbox
    start_btn: gr.Button
    stop_btn: gr.Button
    status: gr.Markdown
    runs: gr.Dropdown
    open_btn: gr.Button
    # plot and pick
    x_axis: gr.Radio
    y_axis: gr.Radio
    plot: gr.Plot
    pick_bridge: gr.Textbox
    pick_bridge_btn: gr.Button
    pick_box: gr.Textbox
    pick_btn: gr.Button
    subnet_file: gr.File
    # card and actions
    card: gr.Markdown
    layers: gr.Plot
    reform_btn: gr.Button
    measure_btn: gr.Button
    eval_btn: gr.Button
    eval_tasks: gr.CheckboxGroup
    eval_limit: gr.Number
    compare_btn: gr.Button
    export_format: gr.Radio
    export_btn: gr.Button
    download: gr.File
    report_btn: gr.Button
    report_file: gr.File
    action_status: gr.Markdown
    # prompt
    prompt: gr.Textbox
    sample: gr.Checkbox
    temperature: gr.Slider
    top_p: gr.Slider
    gen_seed: gr.Number
    max_tokens: gr.Slider
    gen_btn: gr.Button
    out_original: gr.Textbox
    out_a: gr.Textbox
    out_b: gr.Textbox
    # compare
    compare: gr.Dataframe


def build(default_model: str = ModelSettings().model) -> UI:
    d = DecodeSettings()
    search_defaults = SearchSettings()
    with gr.Blocks(title="Subnet Explorer", fill_width=True) as demo:
        # One Session per tab from the start (Gradio deep-copies this default per tab), so that overlapping
        # handlers all change the same object instead of each creating its own.
        session = gr.State(Session())
        gr.Markdown(INTRO)
        message = gr.Markdown("", elem_id="message")
        with gr.Row(equal_height=False):
            model_box = gr.Textbox(default_model, label="Model", scale=3,
                                   info="'default' = embedded SmolLM2-135M-Instruct; or a local folder / hub id")
            dtype = gr.Dropdown(["float32", "bfloat16", "float16"], value=ModelSettings().dtype, label="dtype", scale=1)
            device = gr.Dropdown(["cpu", "cuda", "auto"], value=ModelSettings().device, label="device", scale=1)
            load_btn = gr.Button("Load", variant="primary", scale=1)
        model_info = gr.Markdown("*No model loaded yet. The plot shows the shipped example run.*",
                                 elem_id="model-info")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=280):
                gr.Markdown("### Search")
                targets = gr.Textbox(",".join(f"{t:g}" for t in search_defaults.targets),
                                     label="Targets (fraction of total parameters)")
                preset = gr.Radio(list(PRESETS), value=search_defaults.preset_name, label="Budget preset")
                fitness_mode = gr.Radio([("the sliced subnet (paper)", "paper"),
                                         ("after reformation (pre-reformed levels)", "reformed")],
                                        value=search_defaults.fitness_mode, label="Rank subnets by their perplexity",
                                        info="reformation-aware: each block's widths come pre-reformed, so the "
                                             "search ranks what a reformed pick gives")
                space = gr.Radio([("head dimensions (paper)", "dims"), ("whole heads (runs in llama.cpp)", "heads")],
                                 value=search_defaults.space, label="Prune attention by",
                                 info="whole heads keep one head size, so a pick exports as GGUF for llama.cpp "
                                      "and Ollama; head dimensions reach lower perplexity")
                with gr.Accordion("Budget details", open=False):
                    # text fields: blank is sent as blank, and means the preset's value
                    population = gr.Textbox("", label="Population (blank = preset)", placeholder="preset")
                    generations = gr.Textbox("", label="Generations (blank = preset)", placeholder="preset")
                    minutes = gr.Textbox("", label="Time budget, minutes (blank = the preset's)", placeholder="preset",
                                         info="the targets share it; each stops with the best it has "
                                              f"(demo: {PRESETS['demo'].minutes:g} min; paper: none)")
                    fitness_windows = gr.Textbox("", label="Fitness windows (blank = preset)", placeholder="preset")
                    baselines = gr.Checkbox(True, label="Also run the baselines (magnitude, Wanda-sp, FLAP)",
                                            info="FLAP and uniform FLAP with their bias compensation, as in FLAP's code")
                seed = gr.Number(0, label="Seed", precision=0)
                run_name = gr.Textbox("", label="Run name (blank = automatic)")
                with gr.Row():
                    start_btn = gr.Button("Start search", variant="primary")
                    stop_btn = gr.Button("Stop", variant="stop")
                status = gr.Markdown("", elem_id="status-box")
                gr.Markdown("### Saved runs")
                # Custom values allowed: the choices are filled per tab on page load, which API clients never
                # trigger; every name is checked by Workspace.run_dir (no path can leave the runs folders).
                runs = gr.Dropdown([], label="Run", allow_custom_value=True)
                open_btn = gr.Button("Open run")
            with gr.Column(scale=3, min_width=480):
                with gr.Row():
                    x_axis = gr.Radio(list(X_AXES), value="parameters (% of dense)", label="x axis")
                    y_axis = gr.Radio(list(Y_AXES), value="perplexity (held-out, else search fitness)",
                                      label="y axis")
                plot = gr.Plot(label="Quality vs cost — click a point to pick it", elem_id="pareto-plot",
                               show_label=True)
                pick_bridge = gr.Textbox("", elem_id="pick-bridge", elem_classes="hidden-bridge", show_label=False)
                pick_bridge_btn = gr.Button("pick", elem_id="pick-bridge-btn", elem_classes="hidden-bridge")
                with gr.Row(equal_height=False):
                    pick_box = gr.Textbox("", label="…or pick by id", scale=3, elem_id="pick-box")
                    pick_btn = gr.Button("Pick", scale=1)
                    subnet_file = gr.File(label="…or open a subnet JSON (for the loaded model)", file_types=[".json"],
                                          type="filepath", file_count="single", scale=2, height=120,
                                          elem_id="subnet-file")
            with gr.Column(scale=2, min_width=320):
                gr.Markdown("### Picked subnet")
                card = gr.Markdown(NO_PICK, elem_id="subnet-card")
                layers = gr.Plot(label="Kept width per layer", elem_id="layer-plot")
                with gr.Row():
                    reform_btn = gr.Button("Reform")
                    measure_btn = gr.Button("Measure latency")
                    compare_btn = gr.Button("Add to compare")
                with gr.Accordion("Evaluate", open=False):
                    eval_tasks = gr.CheckboxGroup(list(DEFAULT_TASKS), value=list(DEFAULT_TASKS[:2]), label="Tasks")
                    eval_limit = gr.Number(APP_EVAL_LIMIT, label="Questions per task (0 = every question: slow)",
                                           precision=0)
                    eval_btn = gr.Button("Evaluate")
                export_format = gr.Radio([("transformers folder", "hf"), ("GGUF for llama.cpp / Ollama", "gguf")],
                                         value="hf", label="Export as", elem_id="export-format",
                                         info="GGUF needs a whole-head subnet: search with \"Prune attention by: whole heads\", "
                                              "or pick a baseline")
                export_btn = gr.Button("Export & download", variant="primary")
                download = gr.File(label="Download (verified export, zip)", interactive=False, elem_id="download")
                action_status = gr.Markdown("", elem_id="action-status")
                report_btn = gr.Button("Run report (HTML)")
                report_file = gr.File(label="Run report: the fronts, the picks you worked on, your prompts",
                                      interactive=False, elem_id="report-file")
        gr.Markdown("### Prompt the original and your picks side by side")
        with gr.Row(equal_height=False):
            prompt = gr.Textbox("Write two sentences about the sea.", label="Prompt", lines=2, scale=4)
            with gr.Column(scale=2):
                with gr.Row():
                    sample = gr.Checkbox(d.do_sample, label="Sample (else greedy)")
                    gen_seed = gr.Number(d.seed, label="Seed", precision=0)
                temperature = gr.Slider(0.05, 2.0, d.temperature, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1.0, d.top_p, step=0.05, label="Top-p")
                max_tokens = gr.Slider(8, 256, d.max_new_tokens, step=8, label="Max new tokens")
            gen_btn = gr.Button("Generate", variant="primary", scale=1)
        with gr.Row(equal_height=True):
            out_original = gr.Textbox(label="Original", lines=8, elem_id="out-original", elem_classes="gen-box")
            out_a = gr.Textbox(label="Pick A", lines=8, elem_id="out-a", elem_classes="gen-box")
            out_b = gr.Textbox(label="Pick B", lines=8, elem_id="out-b", elem_classes="gen-box")
        gr.Markdown("### Compare")
        compare = gr.Dataframe(compare_frame([]), label="Picked subnets", interactive=False,
                               elem_id="compare-table", wrap=True)
    return UI(demo=demo, session=session, message=message, model_box=model_box, dtype=dtype, device=device,
              load_btn=load_btn, model_info=model_info, targets=targets, preset=preset, population=population,
              minutes=minutes, fitness_mode=fitness_mode, space=space,
              generations=generations, fitness_windows=fitness_windows, seed=seed, run_name=run_name,
              baselines=baselines, start_btn=start_btn, stop_btn=stop_btn, status=status, runs=runs, open_btn=open_btn,
              x_axis=x_axis, y_axis=y_axis, plot=plot, pick_bridge=pick_bridge, pick_bridge_btn=pick_bridge_btn,
              pick_box=pick_box, pick_btn=pick_btn, subnet_file=subnet_file, card=card, layers=layers,
              reform_btn=reform_btn, measure_btn=measure_btn, eval_btn=eval_btn, eval_tasks=eval_tasks,
              eval_limit=eval_limit, compare_btn=compare_btn, export_format=export_format,
              export_btn=export_btn, download=download,
              report_btn=report_btn, report_file=report_file, action_status=action_status, prompt=prompt,
              sample=sample, temperature=temperature, top_p=top_p, gen_seed=gen_seed, max_tokens=max_tokens,
              gen_btn=gen_btn, out_original=out_original, out_a=out_a, out_b=out_b, compare=compare)
