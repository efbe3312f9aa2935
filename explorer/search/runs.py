"""The run directory: nothing a search finds is lost.

    run.json          settings (model spec, targets, preset, seed, corpus, base ModelShape),
                      created time and status (running / finished / cancelled / failed)
    candidates.jsonl  one JSON object per evaluated candidate, appended and flushed as it happens
                      (a shipped, finished run may hold it xz-compressed: candidates.jsonl.xz)
    annotations.jsonl later measurements of a candidate ({"id", "metrics"}), merged on read
    events.jsonl      optional log of the search's events
    importance.pt     the calibration scores, so a resume skips calibration
    channel_means.safetensors  the dense model's mean o_proj / down_proj inputs: every compensated
                      candidate's biases are rebuilt from it, exactly
    latency_model.json the latency model the predictions came from

`open_run` needs no model: a run can be browsed (candidates, fronts) anywhere.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import ExplorerError
from ..model.subnet import ModelShape, Subnet
from .pareto import fronts_of

SHIPPED_RUNS = Path(__file__).resolve().parents[2] / "assets" / "runs"  # precomputed runs the project ships
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
SEARCH_ORIGINS = ("search", "init")


class RunError(ExplorerError):
    """A run directory that is missing, malformed or not allowed."""


def target_words(target: float, share: str = "total") -> str:
    """A target in words: "70%" of the total parameters, or "70% of blocks" (embeddings excluded)."""
    return f"{target:.0%}" + ("" if share == "total" else " of blocks")


@dataclass(frozen=True)
class Candidate:
    id: str
    target: float
    generation: int
    origin: str  # "search" | "init" | "baseline:<name>" | "dense" | "upload"
    subnet: Subnet
    metrics: dict = field(default_factory=dict, compare=False)
    compensated: bool = False  # its model carries bias compensation (rebuilt from the run's channel means)
    means: str | None = None  # digest of the channel means it is compensated with, when not the run's own
    share: str = "total"  # what its target is a fraction of (explorer.search.space.SHARES)

    @property
    def target_words(self) -> str:
        """Its target as a reader should see it: "70%", or "70% of blocks" for a share of the blocks."""
        return target_words(self.target, self.share)

    def to_dict(self) -> dict:
        d = {"id": self.id, "target": self.target, "generation": self.generation, "origin": self.origin,
             "compensated": self.compensated, "subnet": self.subnet.to_dict(compact=True), "metrics": self.metrics}
        if self.means:
            d["means"] = self.means
        if self.share != "total":
            d["share"] = self.share
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Candidate":
        origin = str(d["origin"])
        # FLAP candidates of runs written before the field was stored were evaluated with their biases
        compensated = bool(d.get("compensated", origin == "baseline:flap"))
        return cls(str(d["id"]), float(d["target"]), int(d["generation"]), origin, Subnet.from_dict(d["subnet"]),
                   dict(d.get("metrics", {})), compensated, d.get("means"), str(d.get("share", "total")))

    @property
    def fitness(self) -> float:
        """Fitness perplexity; infinity when the evaluation stopped early (only a lower bound)."""
        m = self.metrics
        return float("inf") if m.get("fitness_lower_bound") else float(m.get("fitness_ppl", float("inf")))


def run_path(name: str, root: str | Path) -> Path:
    """A run's folder under `root`; names are plain (no separators, no '..'), so none escapes it."""
    if not isinstance(name, str) or not RUN_NAME.match(name) or ".." in name:
        raise RunError(f"not a valid run name {name!r}: use letters, digits, '.', '_' and '-' (up to 100)")
    root = Path(root).resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise RunError(f"run name {name!r} escapes the runs folder")
    return path


class Run:
    """A run directory, read and appended to."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._extra: dict[str, dict] = {}

    @property
    def settings(self) -> dict:
        return self.meta.get("settings", {})

    @property
    def meta(self) -> dict:
        f = self.path / "run.json"
        try:
            return json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise RunError(f"{f} is missing or unreadable ({type(e).__name__})") from None

    @property
    def shape(self) -> ModelShape:
        return ModelShape(**self.meta["shape"])

    @property
    def status(self) -> str:
        return self.meta.get("status", "unknown")

    def set_status(self, status: str, **extra) -> None:
        meta = self.meta
        meta.update(status=status, updated=time.time(), **extra)
        _write_json(self.path / "run.json", meta)

    # ---- candidates ------------------------------------------------------------------------
    def candidates(self) -> list[Candidate]:
        """Every stored candidate, annotations merged into its metrics. A torn last line (a crash
        mid-write) is skipped."""
        notes = _read_jsonl(self.path / "annotations.jsonl")
        extra: dict[str, dict] = {}
        for n in notes:
            extra.setdefault(str(n.get("id")), {}).update(n.get("metrics", {}))
        out = []
        for d in _read_jsonl(self.path / "candidates.jsonl"):
            c = Candidate.from_dict(d)
            if c.id in extra:
                c = replace(c, metrics={**c.metrics, **extra[c.id]})
            out.append(c)
        return out

    def append(self, candidate: Candidate) -> None:
        _append_jsonl(self.path / "candidates.jsonl", candidate.to_dict())

    def annotate(self, cid: str, metrics: dict) -> None:
        _append_jsonl(self.path / "annotations.jsonl", {"id": cid, "metrics": metrics})

    def log_event(self, record: dict) -> None:
        _append_jsonl(self.path / "events.jsonl", record)

    def channel_means(self, digest: str | None = None):
        """The channel means compensated candidates' biases are built from (slicing.ChannelMeans): the
        run's own (`channel_means.safetensors`, or for older runs inside `importance.pt`), or with
        `digest` those a candidate brought from a subnet file (`means/DIGEST.safetensors`)."""
        from ..model.slicing import ChannelMeans

        if digest:
            f = self.path / "means" / f"{digest}.safetensors"
            if not f.is_file():
                raise RunError(f"{self.path} lacks the channel means {digest} its candidate was compensated with")
            return ChannelMeans.load(f)
        f = self.path / "channel_means.safetensors"
        if f.is_file():
            return ChannelMeans.load(f)
        if (self.path / "importance.pt").is_file():
            from ..calibrate.importance import Importance

            return Importance.load(self.path / "importance.pt").channel_means()
        raise RunError(f"{self.path} has no channel means (channel_means.safetensors), so its bias-compensated "
                       "candidates cannot be rebuilt")

    def keep_means(self, means) -> str:
        """Store channel means a candidate brings (a subnet file's); their digest, which names them."""
        digest = means.digest()
        f = self.path / "means" / f"{digest}.safetensors"
        if not f.is_file():
            f.parent.mkdir(exist_ok=True)
            tmp = f.with_suffix(".tmp")
            means.save(tmp)
            os.replace(tmp, f)
        return digest

    def means_of(self, c: Candidate):
        """What rebuilds a candidate's compensation: None for an uncompensated one."""
        return self.channel_means(c.means) if c.compensated else None

    def latency_model(self):
        """The run's latency model (latency_model.LatencyModel), or None."""
        f = self.path / "latency_model.json"
        if not f.is_file():
            return None
        from .latency_model import LatencyModel

        try:
            return LatencyModel.from_dict(json.loads(f.read_text(encoding="utf-8")))
        except (ValueError, TypeError, KeyError):
            return None  # a latency model from an older version: predictions stay as stored

    def fronts(self) -> dict[str, list[str]]:
        """Candidate ids on the quality-vs-parameters and quality-vs-latency fronts."""
        return fronts_of(self.candidates())

    def pick(self, pick: str) -> Candidate:
        """A candidate by id; "best@0.7": the search's pick at that target (the best of its re-scored
        top candidates, else the best fitness among its own candidates); "baseline:flap@0.7": that
        baseline's subnet at that target."""
        cands = self.candidates()
        if pick.startswith("baseline:") and "@" in pick:
            origin, _, at = pick.rpartition("@")
            try:
                target = float(at)
            except ValueError:
                raise RunError(f"bad pick {pick!r}: use baseline:NAME@FRACTION, e.g. baseline:flap@0.7") from None
            found = [c for c in cands if c.origin == origin and abs(c.target - target) < 1e-9]
            if not found:
                have = sorted({f"{c.origin}@{c.target:g}" for c in cands if c.origin.startswith("baseline:")})
                raise RunError(f"no {origin} at target {target:g} in {self.path} (there are: {', '.join(have) or 'none'})")
            return found[0]
        if pick.startswith("best@"):
            try:
                target = float(pick[5:])
            except ValueError:
                raise RunError(f"bad pick {pick!r}: use best@FRACTION, e.g. best@0.7") from None
            pool = [c for c in cands if abs(c.target - target) < 1e-9 and c.origin in SEARCH_ORIGINS
                    and c.fitness < float("inf")]
            if not pool:
                targets = sorted({c.target for c in cands if c.origin in SEARCH_ORIGINS})
                raise RunError(f"no search candidate at target {target} (targets: {targets})")
            selected = [c for c in pool if "selection_ppl" in c.metrics]  # the search's final pick (search.select)
            if selected:
                return min(selected, key=lambda c: (c.metrics["selection_ppl"], c.id))
            return min(pool, key=lambda c: (c.fitness, c.id))
        for c in cands:
            if c.id == pick:
                return c
        raise RunError(f"no candidate {pick!r} in {self.path}")


def create_run(path: str | Path, settings: dict, shape: ModelShape) -> Run:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    if (p / "run.json").exists():
        raise RunError(f"{p} already holds a run; resume it or choose another folder")
    now = time.time()
    _write_json(p / "run.json", {"settings": settings, "shape": shape.to_dict(), "created": now, "updated": now,
                                 "status": "running"})
    (p / "candidates.jsonl").touch()
    return Run(p)


def open_run(run_dir: str | Path) -> Run:
    p = Path(run_dir)
    if not (p / "run.json").is_file():
        raise RunError(f"no run at {p} (run.json is missing)")
    run = Run(p)
    run.meta  # noqa: B018 - fail early on a malformed run.json
    return run


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file, or of its xz-compressed copy (shipped runs: `candidates.jsonl.xz`)."""
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif path.with_name(path.name + ".xz").is_file():
        import lzma

        text = lzma.decompress(path.with_name(path.name + ".xz").read_bytes()).decode("utf-8")
    else:
        return []
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a crash
    return out
