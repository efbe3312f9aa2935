"""Where the application layer finds and puts things: saved runs by name (the user's runs folder,
then the runs the project ships), new run folders, the uploads run of each base model, and the
exports folder the app may serve downloads from. Names never leave their folder; the CLI (and
only it) may also name a run folder by its path.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ..search.runs import SHIPPED_RUNS, Run, RunError, open_run, run_path

DEMO_RUN = "smollm2-135m-demo"  # what a new page opens


def model_key(spec: str, dtype: str = "float32", device: str = "cpu") -> tuple:
    """The key of a loaded model: (spec, dtype, device)."""
    return ((spec or "").strip() or "default", dtype, device)


def slug(spec: str) -> str:
    base = "smollm2" if spec in ("default", "") else spec.rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", base)[:40] or "model"


def uploads_run_name(spec: str) -> str:
    """One uploads run per base model: readable slug plus a hash of the spec (two folders may share a name)."""
    return f"uploads-{slug(spec)}-{hashlib.sha1(spec.encode()).hexdigest()[:6]}"


class RunFolders:
    def __init__(self, runs_root: str | Path, exports_root: str | Path, shipped_runs: Path | None = SHIPPED_RUNS,
                 allow_paths: bool = False):
        self.runs_root = Path(runs_root)
        self.exports_root = Path(exports_root)
        self.shipped_runs = shipped_runs
        self.allow_paths = allow_paths  # the CLI opens run folders by path; the app only by name

    def run_dir(self, name: str) -> Path:
        """A run by name: the user's runs first, then the shipped ones."""
        if self.allow_paths and (Path(name) / "run.json").is_file():
            return Path(name)
        for root in (self.runs_root, self.shipped_runs):
            if root is None:
                continue
            p = run_path(name, root)
            if (p / "run.json").is_file():
                return p
        raise RunError(f"no saved run named {name}")

    def new_run_dir(self, name: str) -> Path:
        """A folder for a new run, refused when the name is taken (nothing is created here)."""
        if self.allow_paths and ("/" in name or os.sep in name):
            path = Path(name)
        else:
            path = run_path(name, self.runs_root)
        if path.exists():
            raise RunError(f"a run named {name} exists already; choose another name")
        return path

    def open(self, name: str) -> Run:
        return open_run(self.run_dir(name))

    def writable(self, name: str) -> bool:
        """Whether measurements may be added to a run: the user's runs (the shipped ones stay as shipped)."""
        path = self.run_dir(name)
        return self.allow_paths or path.parent.resolve() == self.runs_root.resolve()

    def runs(self) -> list[str]:
        """Saved runs: the user's newest first, then the shipped ones."""
        names = []
        for root in (self.runs_root, self.shipped_runs):
            if root is not None and root.is_dir():
                names += sorted((p.name for p in root.iterdir() if (p / "run.json").is_file()),
                                key=lambda n: -(root / n / "run.json").stat().st_mtime)
        return list(dict.fromkeys(names))

    def default_run(self) -> str | None:
        """What a new page shows: the shipped demo run (never someone's latest upload)."""
        runs = self.runs()
        return DEMO_RUN if DEMO_RUN in runs else (runs[0] if runs else None)

    def export_dir(self, name: str) -> Path:
        """An export's folder under the exports root, named after what it holds."""
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:120]
        self.exports_root.mkdir(parents=True, exist_ok=True)
        return self.exports_root / safe

    def is_ours(self, path: str | os.PathLike | None) -> bool:
        """Downloads serve only files the app created under its exports folder."""
        if not path:
            return False
        try:
            Path(path).resolve().relative_to(self.exports_root.resolve())
            return True
        except ValueError:
            return False


__all__ = ["RunFolders", "DEMO_RUN", "model_key", "slug", "uploads_run_name"]
