"""One evaluation entry for the dense model, a sliced subnet or an exported folder.

`evaluate` combines held-out perplexity (explorer.model.perplexity on explorer.calibrate.data windows) with
zero-shot accuracy (explorer.pick.zeroshot) into one frozen `EvalResult` that round-trips through
JSON, so the app's y axis, the compare table, the CLI and the benchmarks read the same record.

`load_any` opens whatever `--model` names. Exported subnet folders (config `model_type`
"subnet_llm") are rebuilt with *this package's* `SubnetForCausalLM`, the class the export copies
verbatim into the folder, so no code from the folder runs and `trust_remote_code` is not needed.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from ..errors import ExplorerError
from ..events import EventSink, Finished, Progress, no_event
from ..settings import DataSettings, ModelSettings
from .zeroshot import TASKS, TaskResult, ZeroShotSettings, average, canonical_task, evaluate_tasks

log = logging.getLogger(__name__)

PPL = "ppl"
DEFAULT_TASKS: tuple[str, ...] = (PPL, *TASKS)


class EvalError(ExplorerError):
    """Bad evaluation input (task list, limit, model folder)."""


@dataclass(frozen=True)
class EvalSettings:
    """Every default of an evaluation: the CLI and the app read them from here."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    limit: int | None = ZeroShotSettings.limit
    seed: int = ZeroShotSettings.seed
    batch_size: int = ZeroShotSettings.batch_size
    corpus: str = DataSettings.corpus
    seq_len: int = DataSettings.seq_len
    heldout_windows: int = DataSettings.heldout_windows

    def to_dict(self) -> dict:
        return {**asdict(self), "tasks": list(self.tasks)}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalSettings":
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if "tasks" in kw:
            kw["tasks"] = tuple(kw["tasks"])
        return cls(**kw)


@dataclass(frozen=True)
class EvalResult:
    model: str  # what was evaluated (a name for tables)
    settings: EvalSettings
    ppl: float | None = None  # held-out perplexity, when "ppl" was asked for
    tasks: tuple[TaskResult, ...] = ()
    seconds: float = 0.0
    info: dict = field(default_factory=dict)  # free-form context (params, subnet key, source)

    @property
    def average(self) -> float | None:
        """Mean headline zero-shot score over the tasks run (None without tasks)."""
        return average(self.tasks)

    def task(self, name: str) -> TaskResult | None:
        name = canonical_task(name)
        return next((t for t in self.tasks if t.task == name), None)

    def metrics(self) -> dict[str, float]:
        """Flat name -> value for plots: ppl, each task's headline score, and the average."""
        out: dict[str, float] = {}
        if self.ppl is not None:
            out[PPL] = self.ppl
        out.update({t.task: t.score for t in self.tasks})
        if self.tasks:
            out["average"] = self.average
        return out

    def to_dict(self) -> dict:
        return {"model": self.model, "settings": self.settings.to_dict(), "ppl": self.ppl,
                "tasks": [t.to_dict() for t in self.tasks], "average": self.average,
                "seconds": self.seconds, "info": self.info}

    @classmethod
    def from_dict(cls, d: dict) -> "EvalResult":
        return cls(d["model"], EvalSettings.from_dict(d["settings"]), d.get("ppl"),
                   tuple(TaskResult.from_dict(t) for t in d.get("tasks", ())), d.get("seconds", 0.0),
                   dict(d.get("info", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "EvalResult":
        return cls.from_dict(json.loads(text))

    def rows(self) -> list[dict]:
        """Table rows (percentages as text) for `format_table`."""
        rows = []
        if self.ppl is not None:
            s = self.settings
            rows.append({"task": PPL, "metric": f"{s.corpus} {s.heldout_windows}x{s.seq_len}",
                         "score": f"{self.ppl:.3f}", "acc": "", "acc_norm": "", "stderr": "", "n": ""})
        for t in self.tasks:
            se = t.acc_norm_stderr if t.metric == "acc_norm" else t.acc_stderr
            rows.append({"task": t.task, "metric": t.metric, "score": f"{100 * t.score:.1f}",
                         "acc": f"{100 * t.acc:.1f}", "acc_norm": f"{100 * t.acc_norm:.1f}",
                         "stderr": f"{100 * se:.1f}", "n": f"{t.n}/{t.total}"})
        if self.tasks:
            rows.append({"task": "average", "metric": "", "score": f"{100 * self.average:.1f}", "acc": "",
                         "acc_norm": "", "stderr": "", "n": ""})
        return rows


TABLE_COLUMNS = ["task", "metric", "score", "acc", "acc_norm", "stderr", "n"]


def format_result(result: EvalResult) -> str:
    from ..tables import format_table

    return format_table(result.rows(), TABLE_COLUMNS)


def parse_tasks(spec: str | Sequence[str]) -> tuple[str, ...]:
    """"ppl,piqa,arc_e" (or a list) -> canonical, de-duplicated names; "all" means every task."""
    names = [n for n in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise EvalError(f"no tasks given; choose from {', '.join(DEFAULT_TASKS)}")
    out: list[str] = []
    for n in names:
        if n.lower() == "all":
            expanded = list(DEFAULT_TASKS)
        elif n.lower() in (PPL, "perplexity"):
            expanded = [PPL]
        else:
            try:
                expanded = [canonical_task(n)]
            except ExplorerError:
                raise EvalError(f"unknown task {n!r}; choose from {', '.join(DEFAULT_TASKS)}") from None
        out.extend(x for x in expanded if x not in out)
    return tuple(out)


def evaluate(model, tokenizer, tasks: str | Sequence[str] | None = None, limit: int | None = -1,
             settings: EvalSettings | None = None, on_event: EventSink = no_event,
             cancel: threading.Event | None = None, name: str = "model", info: dict | None = None) -> EvalResult:
    """Held-out perplexity and/or zero-shot accuracy of any causal LM returning `.logits`.

    `tasks` and `limit` override `settings` (limit -1 keeps the settings' value, None means
    the whole validation sets). Emits Progress events per batch and one Finished at the end.
    """
    s = settings or EvalSettings()
    if tasks is not None:
        s = replace(s, tasks=parse_tasks(tasks))
    else:
        s = replace(s, tasks=parse_tasks(s.tasks))
    if limit != -1:
        s = replace(s, limit=limit)
    if s.limit is not None and s.limit < 1:
        raise EvalError(f"the limit must be at least 1 question per task (got {s.limit})")
    t0 = time.perf_counter()
    ppl = None
    if PPL in s.tasks:
        ppl = heldout_perplexity(model, tokenizer, s, on_event, cancel)
    zs = [t for t in s.tasks if t != PPL]
    results = evaluate_tasks(model, tokenizer, zs, s.limit, s.seed, s.batch_size, on_event, cancel) if zs else {}
    result = EvalResult(name, s, ppl, tuple(results[t] for t in zs), time.perf_counter() - t0, dict(info or {}))
    on_event(Finished("evaluate", result))
    return result


def heldout_perplexity(model, tokenizer, s: EvalSettings, on_event: EventSink = no_event,
                       cancel: threading.Event | None = None) -> float:
    from ..calibrate.data import heldout_windows, load_corpus
    from ..model.perplexity import perplexity

    held = heldout_windows(tokenizer, load_corpus(s.corpus), s.heldout_windows, s.seq_len)
    n = int(held.shape[0])
    on_event(Progress("perplexity", 0, n, f"{s.corpus}, {n} windows of {s.seq_len} tokens"))
    ppl = perplexity(model, held, on_batch=lambda d, t: on_event(Progress("perplexity", d, t)), cancel=cancel)
    if not math.isfinite(ppl):
        log.warning("held-out perplexity is not finite (%s)", ppl)
    return ppl


def evaluate_subnet(base_model, tokenizer, subnet, shape=None, **kwargs) -> EvalResult:
    """Slice `subnet` out of `base_model` (cheap) and evaluate the physically smaller model."""
    from ..model.slicing import slice_model

    sliced = slice_model(base_model, subnet, shape)
    info = {"subnet": subnet.key(), **kwargs.pop("info", {})}
    return evaluate(sliced, tokenizer, info=info, **kwargs)


# ----------------------------------------------------------------------------- loading


def load_subnet_folder(path: str | Path, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """An exported subnet folder, rebuilt with our own `SubnetForCausalLM` (no remote code runs)."""
    import torch
    from transformers import AutoTokenizer

    from ..model import modeling_subnet
    from ..model.loading import DTYPES
    from ..model.modeling_subnet import SubnetForCausalLM

    folder = Path(path)
    if dtype not in DTYPES:
        raise EvalError(f"unknown dtype {dtype}; use one of float32, bfloat16, float16")
    ours = Path(modeling_subnet.__file__)
    theirs = folder / "modeling_subnet.py"
    if theirs.is_file() and theirs.read_bytes() != ours.read_bytes():
        log.warning("%s was exported by another version of explorer; loading it with this version's code", folder)
    try:
        model = SubnetForCausalLM.from_pretrained(str(folder), dtype=DTYPES[dtype])
        # our config object: otherwise AutoTokenizer reads config.json's auto_map and asks to run remote code
        tokenizer = AutoTokenizer.from_pretrained(str(folder), config=model.config)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise EvalError(f"could not load the exported subnet from {folder}: {first}") from None
    if device not in ("cpu", "auto"):
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EvalError("CUDA was asked for but no GPU is available")
        model.to(device)
    elif device == "auto" and torch.cuda.is_available():
        model.to("cuda")
    model.eval().requires_grad_(False)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_any(spec: str = ModelSettings.model, dtype: str = ModelSettings.dtype, device: str = ModelSettings.device,
             trust_remote_code: bool = ModelSettings.trust_remote_code) -> tuple[Any, Any, str]:
    """(model, tokenizer, name) for "default", a base model folder / hub id, or an exported subnet folder."""
    from ..model.loading import is_subnet_folder

    path = Path(spec).expanduser()
    if spec not in ("", "default", "embedded") and path.is_dir() and is_subnet_folder(path):
        model, tokenizer = load_subnet_folder(path, dtype, device)
        return model, tokenizer, path.name
    from ..model.loading import load_model

    lm = load_model(spec, dtype, device, trust_remote_code)
    return lm.model, lm.tokenizer, lm.name
