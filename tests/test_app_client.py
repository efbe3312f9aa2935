"""The same flow through the API with the real gradio_client: every action has an api_name."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest

pytestmark = pytest.mark.slow

# outputs of every endpoint, in wiring order (explorer/ui/app.py)
OUT = {name: i for i, name in enumerate(["model_info", "status", "plot", "card", "layers", "action_status", "runs",
                                         "pick_box", "download", "compare", "out_original", "out_a", "out_b"])}


@pytest.fixture
def client(app_server):
    from gradio_client import Client

    return Client(app_server["url"], verbose=False)


def test_api_flow(client, tmp_path):
    from gradio_client.exceptions import AppError

    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/load_model", "/search", "/stop_search", "/open_run", "/pick", "/reform", "/evaluate",
            "/add_compare", "/export", "/generate"} <= endpoints

    # an action before loading anything is a readable error, not a crash
    with pytest.raises(AppError, match="load a model first|pick a subnet first|open a run"):
        client.predict(api_name="/reform")

    r = client.predict("default", "float32", "cpu", api_name="/load_model")
    assert "Dense held-out perplexity" in r[OUT["model_info"]]

    job = client.submit("0.6", "demo", 4, 1, 1, 3, "api-run", False, "parameters (% of dense)",
                        "perplexity (held-out, else search fitness)", api_name="/search")
    statuses = [o[OUT["status"]] for o in job]
    assert any("candidates evaluated" in (s or "") for s in statuses)
    assert "finished" in job.outputs()[-1][OUT["status"]]

    # the run is saved and reopens without searching again
    r = client.predict("api-run", "parameters (% of dense)", "perplexity (held-out, else search fitness)",
                       api_name="/open_run")
    fig = r[OUT["plot"]]
    assert fig and "customdata" in str(fig)
    import json

    data = json.loads(fig["plot"]) if isinstance(fig, dict) and isinstance(fig.get("plot"), str) else fig
    ids = [cd[0] for tr in data["data"] for cd in (tr.get("customdata") or []) if tr.get("name") != "dense model"]
    assert ids
    r = client.predict(ids[0], "parameters (% of dense)", "perplexity (held-out, else search fitness)",
                       api_name="/pick")
    assert ids[0] in r[OUT["card"]]

    with pytest.raises(AppError, match="no candidate"):
        client.predict("does-not-exist", "parameters (% of dense)", "perplexity (held-out, else search fitness)",
                       api_name="/pick")

    r = client.predict(api_name="/reform")
    assert "Reformed" in r[OUT["action_status"]]
    r = client.predict(api_name="/add_compare")
    job = client.submit("Name a colour.", False, 0.7, 0.9, 0, 8, api_name="/generate")
    outs = list(job)
    last = job.outputs()[-1]
    assert outs and any(isinstance(x, dict) and x.get("value") for x in last[OUT["out_original"]:])

    r = client.predict(api_name="/export")
    zpath = r[OUT["download"]]
    assert zpath and zipfile.is_zipfile(zpath)
    folder = tmp_path / "x"
    with zipfile.ZipFile(zpath) as z:
        z.extractall(folder)
    root = next(p.parent for p in folder.rglob("config.json"))
    code = ("import sys; from transformers import AutoModelForCausalLM; "
            f"m = AutoModelForCausalLM.from_pretrained({str(root)!r}, trust_remote_code=True); "
            "assert 'explorer' not in sys.modules; print(type(m).__name__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "SubnetForCausalLM" in out.stdout, out.stderr[-2000:]


def test_stop_keeps_what_was_found_and_evaluate_through_the_api(client):
    """Stop cancels a running search cleanly (the run keeps its candidates); evaluation fills the card."""
    import time

    client.predict("default", "float32", "cpu", api_name="/load_model")
    job = client.submit("0.8", "demo", 10, 50, 1, 5, "api-stop", False, "parameters (% of dense)",
                        "perplexity (held-out, else search fitness)", api_name="/search")
    import re

    deadline = time.time() + 600
    while time.time() < deadline:
        outs = job.outputs()
        m = re.search(r"(\d+) candidates evaluated", (outs[-1][OUT["status"]] or "") if outs else "")
        if m and int(m.group(1)) >= 3:
            break
        time.sleep(0.5)
    stop = client.predict(api_name="/stop_search")
    assert "Stopping" in stop[OUT["status"]]
    job.result(timeout=600)
    final = job.outputs()[-1][OUT["status"]]
    assert "stopped" in final
    r = client.predict("api-stop", "parameters (% of dense)", "perplexity (held-out, else search fitness)",
                       api_name="/open_run")
    assert "candidates" in r[OUT["status"]]
    n = int(r[OUT["status"]].split("·")[1].split()[0])
    assert n >= 3  # what was found before Stop is kept
    r = client.predict("c00000", "parameters (% of dense)", "perplexity (held-out, else search fitness)",
                       api_name="/pick")
    r = client.predict(["ppl", "piqa"], 8, api_name="/evaluate")
    assert "piqa" in r[OUT["card"]] and "held-out ppl" in r[OUT["card"]]
