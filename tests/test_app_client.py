"""The same flow through the API with the real gradio_client: every action has an api_name."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile

import pytest

pytestmark = pytest.mark.slow

from explorer.ui.app import MESSAGE_OF, client_outputs


def out(result, api_name: str, name: str):
    """One named output of an endpoint's result (each endpoint returns only what it changes)."""
    names = client_outputs(api_name)
    return result if len(names) == 1 and name == names[0] else result[names.index(name)]  # one output: no tuple


def message(result, api_name: str) -> str:
    """What an endpoint said: its section's status line, where its answers and its failures go."""
    m = out(result, api_name, MESSAGE_OF[api_name])
    return str(m.get("value", "") if isinstance(m, dict) else m or "")


@pytest.fixture
def client(app_server):
    from gradio_client import Client

    return Client(app_server["url"], verbose=False)


def test_api_flow(client, app_server, tmp_path):
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/load_model", "/search", "/stop_search", "/open_run", "/pick", "/reform", "/evaluate",
            "/measure_latency", "/add_compare", "/export", "/report", "/generate"} <= endpoints

    # an action before loading anything is a readable message in its one place, not a crash
    r = client.predict(api_name="/reform")
    assert re.search("load a model first|pick a subnet first|open a run", message(r, "reform"))

    r = client.predict("default", "float32", "cpu", api_name="/load_model")
    assert "Dense held-out perplexity" in out(r, "load_model", "model_info") and "⚠️" not in message(r, "load_model")

    job = client.submit("0.6", "total", "demo", 4, 1, None, 1, "paper", "dims", 3, "api-run", False, "parameters (% of dense)",
                        "held-out perplexity", api_name="/search")
    statuses = [out(o, "search", "status") for o in job]
    assert any("candidates evaluated" in str(s or "") for s in statuses)
    assert "finished" in str(out(job.outputs()[-1], "search", "status"))
    # "finished" comes with the last update only: whoever acts on it acts on a settled page
    assert not any("finished" in str(out(o, "search", "status")) for o in job.outputs()[:-1])

    # the run is saved and reopens without searching again
    r = client.predict("api-run", "parameters (% of dense)", "held-out perplexity",
                       api_name="/open_run")
    fig = out(r, "open_run", "plot")
    assert fig and "customdata" in str(fig)
    import json

    data = json.loads(fig["plot"]) if isinstance(fig, dict) and isinstance(fig.get("plot"), str) else fig
    ids = [cd[0] for tr in data["data"] for cd in (tr.get("customdata") or []) if tr.get("name") != "dense model"]
    assert ids
    r = client.predict(ids[0], "parameters (% of dense)", "held-out perplexity",
                       api_name="/pick")
    assert ids[0] in out(r, "pick", "card")

    r = client.predict("does-not-exist", "parameters (% of dense)", "held-out perplexity",
                       api_name="/pick")
    assert "no candidate" in message(r, "pick")

    r = client.predict(api_name="/reform")
    assert "Reformed" in str(out(r, "reform", "action_status"))
    # Evaluate after Reform scores the reformed model: the very figure reformation measured after
    r = client.predict(["ppl"], 8, "parameters (% of dense)", "held-out perplexity", api_name="/evaluate")
    assert "(reformed)" in str(out(r, "evaluate", "action_status")), message(r, "evaluate")
    from explorer.search.runs import open_run

    runs = app_server["base"] / "runs"
    picked = open_run(runs / "api-run").pick(ids[0]).metrics
    assert picked["reformed_heldout_ppl"] == picked["ppl_after"] != picked["ppl_before"]
    r = client.predict("parameters (% of dense)", "held-out perplexity", api_name="/add_compare")
    job = client.submit("Name a colour.", False, 0.7, 0.9, 0, 8, api_name="/generate")
    outs = list(job)
    # the last update that carries text (the very last only stores the tab's prompt: no box changes)
    last = [o for o in job.outputs() if "value" in (out(o, "generate", "out_original") or {})][-1]
    assert outs and out(last, "generate", "out_original").get("value")
    assert "reformed" in out(last, "generate", "out_a").get("label", "")  # the label says what the model is

    r = client.predict(api_name="/report")
    report = out(r, "report", "report_file")
    assert report and "<html" in open(report, encoding="utf-8").read(2000) and "Name a colour." in open(
        report, encoding="utf-8").read()

    # a per-dimension pick cannot be a GGUF: one message saying why, nothing offered for download
    r = client.predict("gguf", api_name="/export")
    download = out(r, "export", "download")
    assert "one head size" in message(r, "export")
    assert not (download.get("value") if isinstance(download, dict) else download)

    r = client.predict("hf", api_name="/export")
    zpath = out(r, "export", "download")
    assert zpath and zipfile.is_zipfile(zpath)
    folder = tmp_path / "x"
    with zipfile.ZipFile(zpath) as z:
        z.extractall(folder)
    root = next(p.parent for p in folder.rglob("config.json"))
    code = ("import sys; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(root)!r}, trust_remote_code=True); "
            "assert 'explorer' not in sys.modules; print(type(m).__name__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert proc.returncode == 0 and "SubnetForCausalLM" in proc.stdout, proc.stderr[-2000:]

    # the export's subnet.json opened in the app is the exported model: compensated and reformed again,
    # it scores the held-out perplexity of the pick it came from
    from gradio_client import handle_file

    r = client.predict(handle_file(str(root / "subnet.json")), "parameters (% of dense)",
                       "held-out perplexity", api_name="/open_subnet")
    status = str(out(r, "open_subnet", "pick_status"))
    assert "bias-compensated, reformed" in status and "⚠️" not in status, status
    upload = [c for c in open_run(next(runs.glob("uploads-*"))).candidates() if c.origin == "upload"][-1]
    assert upload.compensated and upload.metrics["reformed_heldout_ppl"] == picked["ppl_after"]


def test_stop_keeps_what_was_found_and_evaluate_through_the_api(client):
    """Stop cancels a running search cleanly (the run keeps its candidates); evaluation fills the card."""
    import time

    client.predict("default", "float32", "cpu", api_name="/load_model")
    job = client.submit("0.8", "total", "demo", 10, 50, None, 1, "paper", "dims", 5, "api-stop", False, "parameters (% of dense)",
                        "held-out perplexity", api_name="/search")
    deadline = time.time() + 600
    while time.time() < deadline:
        outs = job.outputs()
        m = re.search(r"(\d+) candidates evaluated", str(out(outs[-1], "search", "status") or "") if outs else "")
        if m and int(m.group(1)) >= 3:
            break
        time.sleep(0.5)
    stop = client.predict(api_name="/stop_search")
    assert "Stopping" in str(out(stop, "stop_search", "status"))
    job.result(timeout=600)
    final = str(out(job.outputs()[-1], "search", "status"))
    assert "stopped" in final
    assert not any("stopped" in str(out(o, "search", "status")) for o in job.outputs()[:-1])
    r = client.predict("api-stop", "parameters (% of dense)", "held-out perplexity",
                       api_name="/open_run")
    status = str(out(r, "open_run", "status"))
    assert "candidates" in status
    n = int(status.split("·")[1].split()[0])
    assert n >= 3  # what was found before Stop is kept
    r = client.predict("c00000", "parameters (% of dense)", "held-out perplexity",
                       api_name="/pick")
    r = client.predict(["ppl", "piqa"], 8, "parameters (% of dense)", "held-out perplexity", api_name="/evaluate")
    card = str(out(r, "evaluate", "card"))
    assert "piqa" in card and "held-out ppl" in card


def test_a_whole_head_search_exports_a_gguf_that_llamacpp_runs(client, app_server, embedded, tmp_path):
    """Search in the heads space through the app, pick its 70 % subnet, export it as GGUF from the app;
    the file llama.cpp loads computes the base model with that subnet's omitted heads and channels zeroed
    (an independent reference, built here from the run's record) and answers with the same greedy tokens."""
    import json

    from explorer.model.reference import zeroed_reference
    from explorer.pick.llamacpp import TOLERANCE, check
    from explorer.search.runs import open_run

    client.predict("default", "float32", "cpu", api_name="/load_model")
    job = client.submit("0.7", "total", "demo", 4, 1, None, 1, "paper", "heads", 3, "api-heads", False,
                        "parameters (% of dense)", "held-out perplexity", api_name="/search")
    job.result(timeout=1200)
    assert "finished" in str(out(job.outputs()[-1], "search", "status"))
    run = open_run(app_server["base"] / "runs" / "api-heads")
    assert run.settings["space"] == "heads"
    best = min((c for c in run.candidates() if c.subnet.fraction(embedded.shape) < 0.72), key=lambda c: c.fitness)
    assert best.subnet.head_granular(embedded.shape)
    r = client.predict(best.id, "parameters (% of dense)", "held-out perplexity",
                       api_name="/pick")
    assert best.id in out(r, "pick", "card")
    r = client.predict("gguf", api_name="/export")
    assert "ran it in llama.cpp" in str(out(r, "export", "export_status")), message(r, "export")
    with zipfile.ZipFile(out(r, "export", "download")) as z:
        z.extractall(tmp_path)
    gguf = next(tmp_path.rglob("*.gguf"))
    record = json.loads(next(tmp_path.rglob("export.json")).read_text())
    assert record["gguf"]["head_count"] != [9] * embedded.shape.num_layers  # whole heads were dropped

    from transformers import AutoTokenizer

    from explorer.model.loading import ensure_embedded_cache

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_embedded_cache()))
    ref = zeroed_reference(embedded.model, best.subnet, embedded.shape,
                           run.channel_means() if best.compensated else None)
    res = check(gguf, ref, tokenizer, "The capital of France is", "f16")
    assert res.same_tokenization and res.same_tokens, res.to_dict()
    assert res.max_logit_diff <= TOLERANCE["f16"] * res.logit_std, res.to_dict()


def test_a_typed_search_field_is_read_like_the_cli_set(client, app_server):
    """An advanced field is the VALUE of the CLI's --set KEY=VALUE: the same parser, the same one-line
    refusal, before any run folder exists."""
    client.predict("default", "float32", "cpu", api_name="/load_model")
    for population, words in (("abc", "population (first generation's children) must be a whole number"),
                              ("2.5", "must be a whole number, not 2.5"), ("0", "must be at least")):
        r = client.predict("0.7", "total", "demo", population, "", "", "", "paper", "dims", 0, f"typed-{population}", False,
                           "parameters (% of dense)", "held-out perplexity", api_name="/search")
        said = message(r, "search")
        assert words in said and "\n" not in said.strip(), said
        assert not (app_server["base"] / "runs" / f"typed-{population}").exists()


def test_gemma3_searched_reformed_and_exported_as_gguf_from_the_app(client, app_server, tmp_path):
    """The second embedded model through the app: load Gemma 3 270M by name, search a share of its blocks
    without compensation, reform the pick without the intercept, export it as GGUF (gemma3 architecture,
    checked in llama.cpp by the export); here llama.cpp's file is checked again against the original
    Gemma3ForCausalLM with the omitted weights zeroed and the reformed ones written in: the same greedy
    tokens."""
    import json

    from explorer.model.loading import load_model
    from explorer.model.reference import zeroed_reference
    from explorer.pick.llamacpp import check, tolerance
    from explorer.pick.reform import ReformSettings, reform
    from explorer.search.runs import open_run

    r = client.predict("gemma3-270m", "float32", "cpu", api_name="/load_model")
    assert "Gemma3ForCausalLM" in out(r, "load_model", "model_info")
    job = client.submit("0.6", "prunable", "demo", 4, 1, "1", 1, "paper", "auto", 3, "api-gemma", False,
                        "block parameters (% of the dense blocks)", "held-out perplexity", False, api_name="/search")
    job.result(timeout=1800)
    status = str(out(job.outputs()[-1], "search", "status"))
    assert "finished" in status and "60% of blocks" in status
    run = open_run(app_server["base"] / "runs" / "api-gemma")
    assert run.settings["space"] == "heads" and run.settings["share"] == "prunable" and not run.settings["compensate"]
    best = run.pick("best@0.6")
    r = client.predict(best.id, "block parameters (% of the dense blocks)", "held-out perplexity", api_name="/pick")
    assert best.id in out(r, "pick", "card") and "60% of blocks" in out(r, "pick", "card")
    r = client.predict(False, api_name="/reform")
    assert "Reformed" in message(r, "reform"), message(r, "reform")
    r = client.predict("gguf", api_name="/export")
    assert "ran it in llama.cpp" in str(out(r, "export", "export_status")), message(r, "export")
    with zipfile.ZipFile(out(r, "export", "download")) as z:
        z.extractall(tmp_path)
    record = json.loads(next(tmp_path.rglob("export.json")).read_text())
    assert record["gguf"]["architecture"] == "gemma3"
    lm = load_model("gemma3-270m")
    settings = ReformSettings.from_dict(json.loads(next(tmp_path.rglob("subnet.json")).read_text())["reformation"]
                                        ["settings"])
    assert settings.intercept is False
    reformed = reform(lm, best.subnet, settings).model
    ref = zeroed_reference(lm.model, best.subnet, lm.shape, reformed=reformed)
    res = check(next(tmp_path.rglob("*.gguf")), ref, lm.tokenizer, "The capital of France is", "f16")
    assert res.same_tokenization and res.same_tokens, res.to_dict()
    assert res.max_logit_diff <= tolerance(ref, "f16") * res.logit_std, res.to_dict()


def test_pick_size_through_the_api(client, app_server):
    """The size slider's release as an endpoint: the library's subnet at any size of a searched run is
    evaluated, stored in the run as a candidate of origin "library" and picked; the same size again reads it
    back; a run without a library (or the read-only example run) says why in the pick's status line."""
    from explorer.app.runfolders import DEMO_RUN
    from explorer.search.runs import open_run

    x, y = "parameters (% of dense)", "held-out perplexity"
    assert "/pick_size" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    client.predict("default", "float32", "cpu", api_name="/load_model")
    # one small generation within 6 minutes: the library (quick mode's) is measured within its share, or cached
    job = client.submit("0.7", "total", "demo", 4, 1, "6", 1, "paper", "dims", 0, "api-size", False, x, y,
                        api_name="/search")
    job.result(timeout=1200)
    assert "finished" in str(out(job.outputs()[-1], "search", "status"))

    r = client.predict(0.62, x, y, api_name="/pick_size")
    said = message(r, "pick_size")
    cid = out(r, "pick_size", "pick_box")
    cid = str(cid.get("value") if isinstance(cid, dict) else cid)
    assert "Picked" in said and cid in said and "⚠️" not in said, said
    assert cid in out(r, "pick_size", "card") and "library" in out(r, "pick_size", "card")
    assert cid in out(r, "pick_size", "size_readout") and "measured" in out(r, "pick_size", "size_readout")
    run = open_run(app_server["base"] / "runs" / "api-size")
    c = run.pick(cid)
    assert c.origin == "library" and c.metrics["fitness_ppl"] > 0 and "library_ppl" in c.metrics
    assert c.subnet.fraction(run.shape) <= 0.625

    r = client.predict(0.62, x, y, api_name="/pick_size")  # the same size: read back, not stored twice
    assert cid in message(r, "pick_size")
    assert [k.id for k in open_run(run.path).candidates() if k.origin == "library"] == [cid]

    client.predict(DEMO_RUN, x, y, api_name="/open_run")
    r = client.predict(0.62, x, y, api_name="/pick_size")
    assert re.search("no level library|read-only", message(r, "pick_size")), message(r, "pick_size")


def test_stopping_the_server_deletes_the_files_it_cached_for_the_page(tmp_path):
    """What the page sent or received (uploads, export zips, reports) is copied into Gradio's cache;
    the app deletes its copies when it stops, here by SIGTERM as a service manager stops it."""
    import httpx

    from bench.app import served_app

    cache = tmp_path / "gradio-cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "SUBNET_EXPLORER_QUICK": "1",
           "GRADIO_TEMP_DIR": str(cache)}
    sent = tmp_path / "subnet.json"
    sent.write_text('{"not": "a subnet"}')
    with served_app(tmp_path, env) as (proc, url):
        with open(sent, "rb") as f:
            r = httpx.post(f"{url}gradio_api/upload", files={"files": ("subnet.json", f)}, timeout=30)
        r.raise_for_status()
        cached = r.json()[0]
        assert os.path.isfile(cached) and cached.startswith(str(cache))
    assert proc.wait(5) == 0  # closed cleanly, not killed
    assert not os.path.exists(cached)
    assert not [p for p in cache.rglob("*") if p.is_file()]
