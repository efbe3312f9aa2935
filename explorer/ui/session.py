"""What one browser tab has chosen: small, copyable, kept in `gr.State` (weights never are)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..app.workbench import Reformation


@dataclass
class Session:
    model_key: tuple | None = None
    run: str | None = None  # run name (under the runs root or the shipped assets)
    picked: str | None = None  # candidate id shown in the card
    compare: list[str] = field(default_factory=list)  # ids added to the compare table (first two prompt)
    reformed: dict[str, dict] = field(default_factory=dict)  # run/id -> Reformation.to_dict()
    evaluated: dict[str, dict] = field(default_factory=dict)  # run/id -> extra metrics measured in the app
    prompts: list[dict] = field(default_factory=list)  # {"run", "prompt", "answers": {model: text}, "settings"}

    # Measurements are keyed by run *and* id: candidate ids repeat across runs (every run has a c00000),
    # so a bare id would show one run's reformed perplexity on another run's candidate.
    def note_key(self, cid: str, run: str | None = None) -> str:
        return f"{run or self.run}/{cid}"

    def reformation(self, cid: str, run: str | None = None) -> Reformation | None:
        d = self.reformed.get(self.note_key(cid, run))
        return Reformation(**d) if d else None

    def extra(self, cid: str) -> dict:
        """What this tab measured on candidate `cid` of the current run (evaluation, then reformation)."""
        k = self.note_key(cid)
        r = self.reformed.get(k)
        return {**self.evaluated.get(k, {}), **({"ppl_before": r["ppl_before"], "ppl_after": r["ppl_after"]} if r else {})}

    def is_reformed(self, cid: str) -> bool:
        return self.note_key(cid) in self.reformed

    def shows(self, run: str | None, cid: str) -> bool:
        """Whether the tab still shows this pick: a job that ends after the user moved on must not
        overwrite the card of what they look at now."""
        return (self.run, self.picked) == (run, cid)

    def switch_run(self, name: str) -> "Session":
        """Show run `name`: the pick is cleared, and so are compared ids when the run changes, because
        they name candidates of the old run (whose base model may even differ).

        In place, like every handler's change to the tab's Session: Gradio hands each handler the tab's
        one stored object and stores whatever it returns, so handlers that overlap (a Load clicked while
        the page's first run is opening, a pick during a search) must all return that same object, or
        the last to finish would silently undo the others' changes."""
        if name != self.run:
            self.compare = []
        self.run, self.picked = name, None
        return self
