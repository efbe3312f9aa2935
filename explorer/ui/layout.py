"""The page's components (build) — wiring lives in `handlers.py`."""
from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from ..app.plots import DEFAULT_X, DEFAULT_Y, X_AXES, Y_AXES
from ..app.workbench import AppSettings
from ..model.generation import DecodeSettings
from ..model.loading import embedded_choices
from ..pick.evaluation import DEFAULT_TASKS
from ..settings import PRESETS, ModelSettings, SearchSettings
from .session import Session
from .views import NO_PICK, compare_frame

APP_EVAL_LIMIT = AppSettings.eval_limit  # questions per task when evaluating from the page

INTRO = """# Subnet Explorer
Make a language model **smaller and faster without training**: find subnets that keep its weights, pick one, recalibrate
it, prompt it beside the original, download it."""

CSS = """
.hidden-bridge { display: none !important; }
.gradio-container { padding-top: 4px !important; }
#intro h1 { margin: 0 0 2px 0; font-size: 1.6em; }
#intro p { margin: 0; }
.step h3 { margin: 6px 0 2px 0; }
.status { min-height: 1.5em; }
#status-box { height: 128px; overflow-y: auto; padding: 2px 8px; border: 1px solid var(--border-color-primary);
              border-radius: 6px; }
.status p, .status td { font-size: 0.95em; }
.status table td, .status table th { white-space: nowrap; word-break: keep-all; padding: 2px 6px; }
#model-info p { margin: 2px 0; font-size: 0.92em; }
#subnet-file { min-height: 5em; }
#subnet-file .wrap { font-size: 0.9em; }
.gen-box textarea { font-size: 0.95em; }
"""

# Plotly's click event -> the hidden pick box -> the server (gr.Plot has no select event). The click picks
# the very point Plotly's hover shows (hovermode "closest"), so what the tooltip names is what gets picked;
# overlay traces (rings around points) are not points, and the point beneath them is taken instead.
BRIDGE_JS = """
() => {
  const idOf = (plot, pt) => {
    if (!pt) return null;
    const trace = plot.data && plot.data[pt.curveNumber];
    const cd = pt.customdata;
    if (!cd) return null;
    return String(Array.isArray(cd) ? cd[0] : cd);
  };
  const attach = () => {
    const plot = document.querySelector('#pareto-plot .js-plotly-plot');
    if (plot && plot.on && !plot.__subnetBridge) {
      plot.__subnetBridge = true;
      plot.on('plotly_click', (ev) => {
        const pts = (ev && ev.points) || [];
        const id = idOf(plot, pts.find(p => !(plot.data[p.curveNumber] || {}).meta) || pts[0]);
        if (!id) return;
        const box = document.querySelector('#pick-bridge textarea, #pick-bridge input');
        if (!box) return;
        box.value = id;
        box.dispatchEvent(new Event('input', { bubbles: true }));
        const btn = document.querySelector('#pick-bridge-btn');
        if (btn) setTimeout(() => btn.click(), 50);
      });
    }
  };
  // the plot element is replaced whenever the server sends a new figure: attach as soon as it appears,
  // so that a click right after a replot is not lost
  new MutationObserver(attach).observe(document.body, { childList: true, subtree: true });
  setInterval(attach, 250);
}
"""


@dataclass
class UI:
    """Every component the handlers read or write, by name."""

    demo: gr.Blocks
    session: gr.State
    # 1 · model
    model_box: gr.Dropdown
    dtype: gr.Dropdown
    device: gr.Dropdown
    load_btn: gr.Button
    model_info: gr.Markdown  # what Load found, and what went wrong with it
    # 2 · search
    targets: gr.Textbox
    share: gr.Dropdown
    preset: gr.Radio
    space: gr.Radio
    fitness_mode: gr.Radio
    population: gr.Textbox
    generations: gr.Textbox
    minutes: gr.Textbox
    fitness_windows: gr.Textbox
    seed: gr.Number
    run_name: gr.Textbox
    baselines: gr.Checkbox
    compensate: gr.Checkbox
    start_btn: gr.Button
    stop_btn: gr.Button
    status: gr.Markdown  # the search's progress, and its messages (the runs list's too)
    runs: gr.Dropdown
    open_btn: gr.Button
    # the plot and the pick
    x_axis: gr.Radio
    y_axis: gr.Radio
    plot: gr.Plot
    size: gr.Slider  # the library's subnet at any size: previewed while dragged, picked on release
    size_readout: gr.Markdown  # one line under the slider: its subnet's size, predicted fitness and speed-up
    pick_bridge: gr.Textbox
    pick_bridge_btn: gr.Button
    pick_box: gr.Textbox
    pick_btn: gr.Button
    subnet_file: gr.File
    pick_status: gr.Markdown  # picks and opened files
    # 3 · the pick: card and actions
    card: gr.Markdown
    layers: gr.Plot
    reform_btn: gr.Button
    reform_intercept: gr.Checkbox
    measure_btn: gr.Button
    compare_btn: gr.Button
    eval_tasks: gr.CheckboxGroup
    eval_limit: gr.Number
    eval_btn: gr.Button
    stop_pick_btn: gr.Button
    action_status: gr.Markdown  # what Reform, Measure, Evaluate and Compare found, right under them
    # 4 · prompt
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
    gen_status: gr.Markdown
    # 5 · export
    export_format: gr.Radio
    export_btn: gr.Button
    stop_export_btn: gr.Button
    download: gr.File
    export_status: gr.Markdown
    report_btn: gr.Button
    report_file: gr.File
    compare: gr.Dataframe


def build(file_cache: tuple[int, int], default_model: str = ModelSettings().model) -> UI:
    """The page, top to bottom as the flow: model and search beside the plot (all of it on a projector's
    first screen), then the pick, its prompt and its export, each with its answers under its buttons.
    `file_cache`: AppSettings.file_cache, Gradio's `delete_cache`."""
    d = DecodeSettings()
    s = SearchSettings()
    with gr.Blocks(title="Subnet Explorer", fill_width=True, delete_cache=file_cache) as demo:
        # One Session per tab from the start (Gradio deep-copies this default per tab), so that overlapping
        # handlers all change the same object instead of each creating its own.
        session = gr.State(Session())
        gr.Markdown(INTRO, elem_id="intro")
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=360):
                gr.Markdown("### 1 · Model", elem_classes="step")
                with gr.Row(equal_height=True):
                    model_box = gr.Dropdown(embedded_choices(), value=default_model, label="Model", scale=4,
                                            allow_custom_value=True, filterable=True,
                                            info="embedded SmolLM2-135M or Gemma 3 270M, or type a folder, "
                                                 ".gguf file or hub id")
                    load_btn = gr.Button("Load", variant="primary", scale=1, min_width=80)
                with gr.Accordion("Number format and device", open=False):
                    with gr.Row():
                        dtype = gr.Dropdown(["float32", "bfloat16", "float16"], value=ModelSettings().dtype,
                                            label="Number format (dtype)")
                        device = gr.Dropdown(["cpu", "cuda", "auto"], value=ModelSettings().device, label="Device",
                                             info="auto: spread over the GPUs and the CPU")
                model_info = gr.Markdown("*The plot shows the shipped example run; Load to search.*",
                                         elem_id="model-info", elem_classes="status")
                gr.Markdown("### 2 · Search", elem_classes="step")
                with gr.Row(equal_height=True):
                    targets = gr.Textbox(",".join(f"{t:g}" for t in s.targets), max_lines=1, scale=3,
                                         label="Targets (fractions)", info="e.g. 0.8, 0.7 or 70%")
                    share = gr.Dropdown([("of all parameters", "total"), ("of the blocks (no embeddings)", "prunable")],
                                        value=s.share, label="of", scale=3,
                                        info="Gemma 3 270M: embeddings are 63%")
                with gr.Row(equal_height=True):
                    preset = gr.Dropdown([(f"demo: {PRESETS['demo'].minutes:g} min", "demo"),
                                          ("paper: no clock", "paper")],
                                         value=s.preset_name, label="Budget", scale=2,
                                         info="shared by the targets")
                    space = gr.Dropdown([("auto: narrower where exact", "auto"),
                                         ("narrower heads (paper; lower perplexity)", "dims"),
                                         ("whole heads (exports as GGUF)", "heads")], value=s.space,
                                        label="Attention: keep", scale=3, info="whole heads only for q/k-norm models")
                with gr.Row():  # above the settings below, so that opening them never moves Start off the screen
                    start_btn = gr.Button("Start search", variant="primary")
                    stop_btn = gr.Button("Stop", variant="stop")
                with gr.Accordion("More search settings (blank = the budget's own)", open=False):
                    fitness_mode = gr.Radio([("as cut (paper)", "paper"),
                                             ("as they will be after recalibration (reformation-aware)", "reformed")],
                                            value=s.fitness_mode, label="Rank subnets",
                                            info="by the perplexity of the subnet as cut, or of each block "
                                                 "recalibrated in advance (slower to start, ranks what Reform gives)")
                    with gr.Row():
                        minutes = gr.Textbox("", label="Minutes", placeholder="preset", max_lines=1,
                                             info="time budget for all targets")
                        population = gr.Textbox("", label="Population (blank = preset)", placeholder="preset",
                                                max_lines=1, info="first generation's children")
                    with gr.Row():
                        generations = gr.Textbox("", label="Generations (blank = preset)", placeholder="preset",
                                                 max_lines=1, info="after the first (a cap under a time budget)")
                        fitness_windows = gr.Textbox("", label="Fitness windows (blank = preset)", placeholder="preset",
                                                     max_lines=1, info="text windows each subnet is scored on "
                                                                       "(paper: fitness windows)")
                    with gr.Row():
                        seed = gr.Number(0, label="Seed", precision=0, info="the same seed, the same search")
                        run_name = gr.Textbox("", label="Run name (blank = automatic)", max_lines=1)
                    with gr.Row():
                        baselines = gr.Checkbox(True, label="Also run the baselines (magnitude, Wanda-sp, FLAP)",
                                                info="as FLAP's official code defines them, bias compensation "
                                                     "included")
                        compensate = gr.Checkbox(s.compensate, label="Bias compensation",
                                                 info="the mean of what is cut, added back as a bias (FLAP); "
                                                      "off: Qwen3, SmolLM3 and Gemma 3 subnets export as GGUF")
                with gr.Accordion("Saved runs", open=False):
                    with gr.Row(equal_height=True):
                        # Custom values allowed: the choices are filled per tab on page load, which API clients
                        # never trigger; every name is checked by RunFolders.run_dir (no path leaves the folders).
                        runs = gr.Dropdown([], label="Run", allow_custom_value=True, scale=3)
                        open_btn = gr.Button("Open run", scale=1, min_width=90)
            with gr.Column(scale=8, min_width=560):
                # the search's progress and messages, above the plot it grows (a fixed box: the plot never jumps)
                status = gr.Markdown("", elem_id="status-box", elem_classes="status")
                plot = gr.Plot(show_label=False, elem_id="pareto-plot")
                # no reset button: it would pick (release) the initial size, evaluating a subnet nobody chose
                size = gr.Slider(0.3, 1.0, 0.7, step=0.01, label="Size: the library's best subnet at",
                                 elem_id="size-slider", buttons=[],
                                 info="a share of the run's parameters; drag to see the library's subnet at that "
                                      "size here and in the card (predicted, instantly), release to evaluate and "
                                      "pick it")
                # the slider's answer where the hand is: what the library predicts while dragged, what was measured
                # on release (the card below has the whole subnet)
                size_readout = gr.Markdown("", elem_id="size-readout", elem_classes="status")
                pick_bridge = gr.Textbox("", elem_id="pick-bridge", elem_classes="hidden-bridge", show_label=False)
                pick_bridge_btn = gr.Button("pick", elem_id="pick-bridge-btn", elem_classes="hidden-bridge")
                with gr.Row():
                    x_axis = gr.Dropdown(list(X_AXES), value=DEFAULT_X, label="x axis", scale=1)
                    y_axis = gr.Dropdown(list(Y_AXES), value=DEFAULT_Y, label="y axis", scale=1)
                with gr.Row(equal_height=True):
                    pick_box = gr.Textbox("", label="Click a point, or pick by id", scale=2, elem_id="pick-box",
                                          max_lines=1, placeholder="c00012, best@0.7, baseline:flap@0.7")
                    pick_btn = gr.Button("Pick", scale=1, min_width=70)
                    subnet_file = gr.File(label="…or open a subnet file (an export's subnet.json)",
                                          file_types=[".json"], type="filepath", file_count="single", scale=3,
                                          height=90, elem_id="subnet-file")
                pick_status = gr.Markdown("", elem_id="pick-status", elem_classes="status")
        gr.Markdown("### 3 · The pick: recalibrate, time and score it", elem_classes="step")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                card = gr.Markdown(NO_PICK, elem_id="subnet-card")
            with gr.Column(scale=6):
                layers = gr.Plot(label="Kept width per layer", elem_id="layer-plot")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                with gr.Row():
                    reform_btn = gr.Button("Reform", variant="primary")
                    reform_intercept = gr.Checkbox(True, label="fit biases", min_width=90,
                                                   info="off: no output biases (GGUF of Qwen3, SmolLM3, Gemma 3)")
                    measure_btn = gr.Button("Measure latency")
                    compare_btn = gr.Button("Add to compare")
                    eval_btn = gr.Button("Evaluate", variant="primary")
                    stop_pick_btn = gr.Button("Stop", variant="stop", min_width=70)
                action_status = gr.Markdown("*Reform recalibrates the kept weights from the omitted ones (paper: "
                                            "reformation); Measure times it paired with the original; Evaluate scores "
                                            "it as the tab has it (reformed, once reformed).*", elem_id="action-status",
                                            elem_classes="status")
            with gr.Column(scale=3):
                eval_tasks = gr.CheckboxGroup(list(DEFAULT_TASKS), value=list(DEFAULT_TASKS[:2]), label="Evaluate on",
                                              info="held-out perplexity (ppl) and zero-shot tasks")
                eval_limit = gr.Number(APP_EVAL_LIMIT, label="Questions per task", precision=0,
                                       info="0 = every question (slow)")
        gr.Markdown("### 4 · Prompt the original and your picks side by side", elem_classes="step")
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
            out_original = gr.Textbox(label="Original", lines=7, elem_id="out-original", elem_classes="gen-box")
            out_a = gr.Textbox(label="Pick A", lines=7, elem_id="out-a", elem_classes="gen-box")
            out_b = gr.Textbox(label="Pick B", lines=7, elem_id="out-b", elem_classes="gen-box")
        gen_status = gr.Markdown("", elem_id="gen-status", elem_classes="status")
        gr.Markdown("### 5 · Export and download", elem_classes="step")
        with gr.Row(equal_height=False):
            export_format = gr.Radio([("transformers folder", "hf"), ("GGUF for llama.cpp / Ollama", "gguf")],
                                     value="hf", label="Export as", elem_id="export-format", scale=2,
                                     info="GGUF needs whole heads: search with \"Attention: keep whole heads\", or "
                                          "pick a FLAP or magnitude baseline")
            with gr.Column(scale=2):
                with gr.Row():
                    export_btn = gr.Button("Export & download", variant="primary", scale=3)
                    stop_export_btn = gr.Button("Stop", variant="stop", scale=1, min_width=70)
                export_status = gr.Markdown("", elem_id="export-status", elem_classes="status")
            download = gr.File(label="Download (verified export, zip)", interactive=False, elem_id="download", scale=2,
                               height=110)
        gr.Markdown("### Compare", elem_classes="step")
        compare = gr.Dataframe(compare_frame([]), label="Picked subnets", interactive=False,
                               elem_id="compare-table", wrap=True)
        with gr.Row(equal_height=True):
            report_btn = gr.Button("Run report (HTML)", scale=1)
            report_file = gr.File(label="Run report: the fronts, the picks you worked on, your prompts",
                                  interactive=False, elem_id="report-file", scale=3)
    return UI(demo=demo, session=session, model_box=model_box, dtype=dtype, device=device, load_btn=load_btn,
              model_info=model_info, targets=targets, share=share, preset=preset, space=space, fitness_mode=fitness_mode,
              population=population, generations=generations, minutes=minutes, fitness_windows=fitness_windows,
              seed=seed, run_name=run_name, baselines=baselines, compensate=compensate, start_btn=start_btn, stop_btn=stop_btn, status=status,
              runs=runs, open_btn=open_btn, x_axis=x_axis, y_axis=y_axis, plot=plot, size=size, size_readout=size_readout, pick_bridge=pick_bridge,
              pick_bridge_btn=pick_bridge_btn, pick_box=pick_box, pick_btn=pick_btn, subnet_file=subnet_file,
              pick_status=pick_status, card=card, layers=layers, reform_btn=reform_btn, reform_intercept=reform_intercept, measure_btn=measure_btn,
              compare_btn=compare_btn, eval_tasks=eval_tasks, eval_limit=eval_limit, eval_btn=eval_btn,
              stop_pick_btn=stop_pick_btn, stop_export_btn=stop_export_btn,
              action_status=action_status, prompt=prompt, sample=sample, temperature=temperature, top_p=top_p,
              gen_seed=gen_seed, max_tokens=max_tokens, gen_btn=gen_btn, out_original=out_original, out_a=out_a,
              out_b=out_b, gen_status=gen_status, export_format=export_format, export_btn=export_btn,
              download=download, export_status=export_status, report_btn=report_btn, report_file=report_file,
              compare=compare)
