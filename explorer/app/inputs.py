"""Every user input parsed once, for the CLI and the app alike: size targets, KEY=VALUE overrides,
a search's settings (preset, then the caller's own, then the user's), evaluation limits,
reformation settings, and subnet files. Each parser either returns a value the engine accepts or
raises one ExplorerError line; nothing here does any work.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping

from ..errors import ExplorerError
from ..model.subnet import ModelShape
from ..pick.pickfile import PickFile, file_limit, read_pick_file
from ..pick.reform import ReformSettings
from ..settings import PRESETS, Probs, SearchSettings


def parse_targets(value: Any) -> tuple[float, ...]:
    """'0.9, 0.8, 70%' (or a list of numbers) -> (0.9, 0.8, 0.7); the search checks what the space can
    reach."""
    parts = value.replace(";", ",").split(",") if isinstance(value, str) else list(value or ())
    out = []
    for part in parts:
        text = str(part).strip()
        if not text:
            continue
        try:
            t = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise ExplorerError(f"targets must be numbers like 0.7 or 70%, got {text!r}") from None
        if not math.isfinite(t) or not 0 < t <= 1:
            raise ExplorerError(f"target {text} is outside (0, 1]: targets are fractions of the total parameters")
        out.append(t)
    if not out:
        raise ExplorerError("give at least one target, e.g. 0.7")
    return tuple(out)


def parse_override(text: str) -> tuple[str, object]:
    """'generations=8' -> ('generations', 8): a KEY=VALUE override of a search setting (JSON values,
    else the text itself)."""
    if "=" not in text:
        raise ExplorerError(f"--set takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def search_settings(preset: str, targets: Any, overrides: Mapping[str, object] = (), under: Mapping[str, object] = ()
                    ) -> SearchSettings:
    """The preset's settings, then `under` (the caller's own, e.g. the app's quick mode), then the
    user's `overrides` (only what the user set: a field left blank is absent, so the preset's value
    stays; `minutes: None` is set, and means no time budget). Names and values are checked by the
    search before any work."""
    if preset not in PRESETS:
        raise ExplorerError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    given = {**dict(under), **dict(overrides)}
    for name in ("probs", "first_probs"):
        if isinstance(given.get(name), dict):
            try:
                given[name] = Probs(**given[name])
            except TypeError:
                raise ExplorerError(f"{name} takes depth, ratio, mask and alpha, got {sorted(given[name])}") from None
    from ..search.validate import check_types, check_values

    settings = SearchSettings.preset(preset, **given, targets=parse_targets(targets))
    check_types(settings)  # what needs no model is refused before one loads
    check_values(settings)
    return settings


def parse_limit(value: Any) -> int | None:
    """Questions per zero-shot task: a whole number, 0 meaning every question of the validation set."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ExplorerError(f"the question limit must be a whole number (0: every question), not {value!r}")
    if value < 0:
        raise ExplorerError(f"the question limit must be 0 (every question) or more, not {value}")
    return value or None


def reform_settings(demo: bool = False, **given) -> ReformSettings:
    """The reformation's settings: the default's or the app's (`demo`, what the page uses), with only
    the fields the user gave (None: not given) replaced, and checked."""
    base = ReformSettings.demo() if demo else ReformSettings()
    set_now = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(set_now) - {f.name for f in dataclasses.fields(ReformSettings)})
    if unknown:
        raise ExplorerError(f"unknown reformation setting(s): {', '.join(unknown)}")
    try:
        s = dataclasses.replace(base, **set_now)
    except ValueError as e:
        raise ExplorerError(str(e)) from None
    if s.windows < 1 or s.seq_len < 8:
        raise ExplorerError("reformation needs at least 1 calibration window of at least 8 tokens")
    if s.damp < 0 or s.rho <= 0 or s.iterations < 1 or s.batch_size < 1:
        raise ExplorerError("damp must be at least 0, rho above 0, iterations and the batch size at least 1")
    return s


def read_subnet_file(path: Path, shape: ModelShape, fingerprint: str, dtype: str) -> PickFile:
    """A subnet file for the loaded model: its size bounded by what such a file can hold, read as
    data only, and checked against the model's shape and weights; otherwise one line saying why."""
    from ..model.subnet import SubnetError

    record = read_pick_file(Path(path), file_limit(shape))
    try:
        return record.check(shape, fingerprint, dtype)
    except SubnetError as e:
        raise SubnetError(f"{Path(path).name} does not fit the loaded model ({shape.num_layers} layers, "
                          f"{shape.num_kv_heads} KV groups of {shape.n_pairs} rotary pairs, MLP "
                          f"{shape.intermediate_size}): {e}") from None


__all__ = ["parse_targets", "parse_override", "search_settings", "parse_limit", "reform_settings",
           "read_subnet_file"]
