"""The subnet file: what a user takes home of a pick (every export writes it as `subnet.json`), and
reopens, in the app or the CLI, as exactly the model it describes.

A subnet alone does not decide its model: a compensated subnet carries biases built from the dense
model's mean inputs on calibration data, and a reformed one carries weights fitted on calibration
data. So the file holds what decides the model, not a pointer to a run that may be gone:

    {"format": "subnet-explorer/subnet", "version": 2,
     "subnet": {"layers": [...]},                    # kept KV groups, query heads, rotary pairs, channels
     "compensation": null | {channel means},        # the biases are rebuilt from these vectors (base64)
     "reformation": null | {"settings", "digest", "sketch"},  # reformed again, and checked to match
     "base": {"model", "shape", "dtype", "fingerprint"},      # the model it was cut from
     "source": {"run", "candidate", "origin", "target"}}      # where it came from (information only)

A bare subnet (`{"layers": [...]}`, `Subnet.to_json`) is read as what it says: the plain sliced
subnet, with neither compensation nor reformation. Reading is data only (`json.loads`), with the
size bounded before the file is read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..model.slicing import ChannelMeans
from ..model.subnet import ModelShape, Subnet, SubnetError

FORMAT = "subnet-explorer/subnet"
VERSION = 2
MAX_FILE_BYTES = 64 * 2**20  # no subnet file of any model we can load is larger (a 70B one: ~35 MB)


@dataclass(frozen=True)
class PickFile:
    subnet: Subnet
    means: ChannelMeans | None = None  # compensation: None for a plain sliced subnet
    reformation: dict | None = None  # {"settings": ReformSettings dict, "digest": str, "sketch": [...]}
    base: dict = field(default_factory=dict)  # {"model", "shape", "dtype", "fingerprint"}
    source: dict = field(default_factory=dict)

    @classmethod
    def of(cls, lm, subnet: Subnet, means: ChannelMeans | None = None, reformation: dict | None = None,
           source: dict | None = None) -> "PickFile":
        """The record of `subnet` of the loaded model `lm` (its shape, dtype and weights fingerprint)."""
        from ..model.loading import weights_fingerprint

        base = {"model": lm.name, "shape": lm.shape.to_dict(), "dtype": str(lm.dtype).removeprefix("torch."),
                "fingerprint": weights_fingerprint(lm.model)}
        return cls(subnet, means, reformation, base, dict(source or {}))

    @property
    def compensated(self) -> bool:
        return self.means is not None

    def describe(self) -> str:
        """'compensated, reformed' and the like, for messages."""
        parts = ["bias-compensated" if self.compensated else "without bias compensation"]
        if self.reformation:
            parts.append("reformed")
        return ", ".join(parts)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "subnet": self.subnet.to_dict(),
                "compensation": None if self.means is None else self.means.to_dict(),
                "reformation": self.reformation, "base": self.base, "source": self.source}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def write(self, path: Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def from_json(cls, text: str) -> "PickFile":
        """The record in `text`, or one SubnetError line saying what is wrong with it."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SubnetError(f"not valid JSON: {e}") from None
        except RecursionError:
            raise SubnetError("not a subnet description (nested too deeply)") from None
        if not isinstance(data, dict):
            raise SubnetError("not a subnet description: expected a JSON object")
        if data.get("format") != FORMAT:  # a bare subnet, or an object with a "subnet" field
            return cls(Subnet.from_dict(data.get("subnet", data)))
        if data.get("version") != VERSION:
            raise SubnetError(f"a subnet file of version {data.get('version')!r}; this version reads {VERSION}")
        means = None
        if data.get("compensation") is not None:
            try:
                means = ChannelMeans.from_dict(data["compensation"])
            except (ValueError, TypeError, KeyError) as e:
                raise SubnetError(f"its bias compensation is unreadable ({e})") from None
        reformation = data.get("reformation")
        if reformation is not None and not (isinstance(reformation, dict) and isinstance(reformation.get("settings"), dict)
                                            and isinstance(reformation.get("digest"), str)):
            raise SubnetError("its reformation record lacks the settings and digest that reproduce it")
        base, source = data.get("base") or {}, data.get("source") or {}
        if not isinstance(base, dict) or not isinstance(source, dict):
            raise SubnetError("its base and source must be objects")
        return cls(Subnet.from_dict(data["subnet"]), means, reformation, base, source)

    def check(self, shape: ModelShape, fingerprint: str, dtype: str) -> "PickFile":
        """This file against the loaded model: its shape, and its weights where the file names them
        (in the same dtype). One SubnetError line when it does not fit."""
        self.subnet.validate(shape)
        if self.base.get("shape") and self.base["shape"] != shape.to_dict():
            raise SubnetError(f"it was cut from another model ({self.base.get('model', 'unknown')}: "
                              f"{self.base['shape'].get('num_layers')} layers, hidden size "
                              f"{self.base['shape'].get('hidden_size')})")
        if self.base.get("fingerprint") and self.base.get("dtype") == dtype and self.base["fingerprint"] != fingerprint:
            raise SubnetError(f"it was cut from other weights ({self.base.get('model', 'another model')}, weights "
                              f"{self.base['fingerprint']}; the loaded model's are {fingerprint})")
        if self.means is not None and (len(self.means.o_proj) != shape.num_layers
                                       or any(v.numel() != shape.num_heads * shape.head_dim for v in self.means.o_proj)
                                       or any(v.numel() != shape.intermediate_size for v in self.means.down_proj)):
            raise SubnetError("its bias compensation has vectors of another model's sizes")
        return self


def file_limit(shape: ModelShape) -> int:
    """Largest subnet file of a model of `shape`: every index written out (16 bytes each) and the
    compensation vectors in base64, plus slack. A larger file cannot describe a subnet of it."""
    indices = shape.num_kv_heads * shape.n_pairs + shape.intermediate_size + shape.num_heads
    means = 4 * (shape.num_heads * shape.head_dim + shape.intermediate_size) * 4 // 3 + 8
    return 64 * 1024 + shape.num_layers * (16 * indices + means)


def read_pick_file(path: Path, limit: int = MAX_FILE_BYTES) -> PickFile:
    """A subnet file read as data only, its size bounded before it is read; one SubnetError line."""
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
    except OSError:
        raise SubnetError(f"the file {name} could not be read") from None
    if not path.is_file():
        raise SubnetError(f"{name} is not a file")
    if size == 0:
        raise SubnetError(f"{name} is empty")
    if size > limit:
        raise SubnetError(f"{name} has {size / 2**20:.1f} MiB; a subnet file of this model takes at most "
                          f"{limit / 2**20:.1f} MiB, so it is not one")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise SubnetError(f"{name} is not UTF-8 text, so not a subnet file") from None
    try:
        return PickFile.from_json(text)
    except SubnetError as e:
        raise SubnetError(f"{name} is not a subnet file: {str(e).removeprefix('not a subnet description: ')}") \
            from None
    except (ValueError, TypeError, OverflowError, AttributeError, IndexError, KeyError) as e:
        raise SubnetError(f"{name} is not a subnet file ({type(e).__name__})") from None


__all__ = ["PickFile", "read_pick_file", "file_limit", "FORMAT", "VERSION", "MAX_FILE_BYTES"]
