"""What one browser tab has chosen: small, copyable, kept in `gr.State` (weights never are)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..app.workbench import Reformation


@dataclass
class Session:
    model_key: tuple | None = None
    run: str | None = None  # the run on the plot (under the runs root or the shipped assets)
    picked: str | None = None  # candidate id shown in the card
    pick_run: str | None = None  # the run the pick belongs to (a subnet file's uploads run, or `run`)
    opened: list[list[str]] = field(default_factory=list)  # [run, id] of subnet files opened onto this plot
    compare: list[list[str]] = field(default_factory=list)  # [run, id] added to the compare table (first two prompt)
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

    def extra(self, cid: str, run: str | None = None) -> dict:
        """What this tab measured on candidate `cid` of `run` (default the plot's run)."""
        k = self.note_key(cid, run)
        r = self.reformed.get(k)
        return {**self.evaluated.get(k, {}), **({"ppl_before": r["ppl_before"], "ppl_after": r["ppl_after"]} if r else {})}

    @property
    def pick_at(self) -> tuple[str | None, str | None]:
        """(run, id) of the pick."""
        return (self.pick_run or self.run, self.picked)

    def shows(self, run: str | None, cid: str) -> bool:
        """Whether the tab still shows this pick: a job that ends after the user moved on must not
        overwrite the card of what they look at now."""
        return self.pick_at == (run, cid)

    def choose(self, run: str, cid: str) -> "Session":
        """Pick candidate `cid` of `run` (the plot's run, or an opened file's)."""
        self.pick_run, self.picked = run, cid
        return self

    def open_file(self, run: str, cid: str) -> "Session":
        """A subnet file opened onto the current plot: drawn there and picked, the plot's run kept."""
        if [run, cid] not in self.opened:
            self.opened.append([run, cid])
        return self.choose(run, cid)

    def switch_run(self, name: str) -> "Session":
        """Show run `name`: the pick is cleared, and so are compared ids and opened files when the run
        changes (they belong to the old run's plot, whose base model may even differ).

        In place, like every handler's change to the tab's Session: Gradio hands each handler the tab's
        one stored object and stores whatever it returns, so handlers that overlap (a Load clicked while
        the page's first run is opening, a pick during a search) must all return that same object, or
        the last to finish would silently undo the others' changes."""
        if name != self.run:
            self.compare, self.opened = [], []
        self.run, self.picked, self.pick_run = name, None, None
        return self
