"""The Runs tab: every run directory under the runs root in one sortable table, and overlaid curves of chosen runs.

A row per run directory — app and CLI runs (``<runs root>/<name>``) and sweep trials
(``<sweep folder>/trials/<n>``, for sweep folders directly in the runs root or in ``<runs root>/sweeps/``) — read
from its files only (torch-free): ``config.json`` (task, backbone, adapter, trainable parameters with and without
the head), ``metrics.jsonl`` through :func:`vision_peft.rundir.read_metrics` (the last evaluation record per split;
the headline metric is the record's first scalar, as sweeps rank on), ``final_metrics.json`` (training-loop time)
and a trial's ``sweep_trial.json``.

The state is derived, in this order, from: the app's job list (queued / running / stopped / failed / done, as the
job manager knows it), a trial's ``sweep_trial.json`` (complete → done, pruned, stopped, failed),
``final_metrics.json`` (done), a live process that holds the run's ``train.log`` open (running: found in
``/proc/<pid>/fd``; without procfs, a write in the last :data:`RECENT_S` seconds), else ``interrupted`` (no final
metrics and nothing writes it: ``python -m vision_peft train --resume <dir>`` continues it from its checkpoint). A
directory whose files cannot be read gets the row ``unreadable: <why>`` instead of breaking the table.

Duration is the training loop's time: ``final_metrics.json``'s ``timing.train_seconds`` for finished runs; else from
``config.json``'s write (just before the loop) to the last step record (or to now while it runs).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from vision_peft import rundir

TRIALS_DIR = rundir.SWEEP_TRIALS_DIR
SWEEP_MARKERS = (rundir.SWEEP_DB_FILE, rundir.SWEEP_RECIPE_FILE, rundir.SWEEP_SPACE_FILE)
TRIAL_STATE_FILE = rundir.SWEEP_TRIAL_STATE_FILE
TRIAL_STATES = {"complete": "done", "pruned": "pruned", "stopped": "stopped", "failed": "failed"}
JOB_STATES = {"queued": "queued", "starting": "running", "running": "running", "done": "done", "failed": "failed",
              "stopped": "stopped"}  # fmt: skip
ACTIVE = ("queued", "running")
RECENT_S = 120  # without /proc: a run written to this recently counts as running
COLUMNS = ["run", "task", "backbone", "adapter", "trainable", "trainable (no head)", "metric", "val", "test",
           "duration (s)", "state"]  # fmt: skip
DATATYPES = ["str", "str", "str", "str", "number", "number", "str", "number", "number", "number", "str"]
SELECTION_KEY = "vision_peft-runs-selection"  # the browser's localStorage key of the chosen runs


@dataclass
class RunSummary:
    """One row of the Runs table (numbers are None where the run has none yet)."""

    name: str  # path relative to the runs root (``sweeps/<sweep>/trials/<n>`` for a trial)
    path: Path
    state: str
    task: str = ""
    backbone: str = ""
    adapter: str = ""
    trainable: int | None = None
    trainable_no_head: int | None = None
    metric: str = ""  # the headline metric's name (first scalar of the last val record)
    val: float | None = None
    test: float | None = None
    duration: float | None = None  # seconds of the training loop
    started: float = 0.0  # config.json's write time (sort order)
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def row(self) -> list[Any]:
        return [self.name, self.task, self.backbone, self.adapter, self.trainable, self.trainable_no_head,
                self.metric, _num(self.val), _num(self.test), _num(self.duration, 1), self.state]  # fmt: skip

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def _num(v: float | None, digits: int = 4) -> float | None:
    return round(float(v), digits) if isinstance(v, (int, float)) and math.isfinite(v) else None


def headline(record: dict[str, Any]) -> str | None:
    """The first scalar of an evaluation record (the task's headline metric, as sweeps rank on), or None."""
    skip = ("step", "split")
    return next((k for k, v in record.items() if k not in skip and isinstance(v, (int, float))), None)


# -- finding run directories ---------------------------------------------------------------------------------------
def _is_sweep_folder(d: Path) -> bool:
    return (d / TRIALS_DIR).is_dir() and any((d / m).exists() for m in SWEEP_MARKERS)


def find_runs(runs_root: Path) -> list[tuple[str, Path]]:
    """(name, path) of every run directory under ``runs_root``: its non-hidden sub-folders, and the trials of sweep
    folders in it or in its ``sweeps/`` folder (a sweep folder itself is not a run)."""
    out: list[tuple[str, Path]] = []
    if not runs_root.is_dir():
        return out

    def children(d: Path) -> list[Path]:
        try:
            return sorted(c for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
        except OSError:
            return []

    for d in children(runs_root):
        if d.name == "sweeps" and not (d / rundir.CONFIG_FILE).exists():
            sweeps = [s for s in children(d) if _is_sweep_folder(s)]
        elif _is_sweep_folder(d):
            sweeps = [d]
        else:
            out.append((d.name, d))
            continue
        for s in sweeps:
            trials = children(s / TRIALS_DIR)
            trials.sort(key=lambda t: (not t.name.isdigit(), int(t.name) if t.name.isdigit() else 0, t.name))
            out += [(t.relative_to(runs_root).as_posix(), t) for t in trials]
    return out


def open_logs() -> set[str] | None:
    """Resolved paths of the ``train.log`` files that live processes hold open (the training processes), or None
    where there is no procfs. Processes of other users cannot be looked into and are skipped."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    held: set[str] = set()
    for p in proc.iterdir():
        if not p.name.isdigit():
            continue
        try:
            for fd in (p / "fd").iterdir():
                target = os.readlink(fd)
                if target.endswith("/" + rundir.LOG_FILE):
                    held.add(target)
        except OSError:
            continue
    return held


# -- one run directory ---------------------------------------------------------------------------------------------
def _mtime(p: Path) -> float | None:
    try:
        return p.stat().st_mtime
    except OSError:
        return None


def _alive(d: Path, held: set[str] | None, now: float) -> bool:
    """Whether a live process trains in ``d`` (it holds ``train.log`` open; without procfs: a recent write)."""
    log = d / rundir.LOG_FILE
    if held is not None:
        return str(log.resolve()) in held
    recent = [t for t in (_mtime(log), _mtime(d / rundir.METRICS_FILE)) if t is not None]
    return bool(recent) and now - max(recent) < RECENT_S


def summarise(
    name: str, d: Path, job: Any = None, held: set[str] | None = None, now: float | None = None
) -> RunSummary:
    """The row of run directory ``d``; never raises (a damaged directory gives ``state="unreadable: <why>"``).

    Args:
        name: the row's name.
        d: the run directory.
        job: the app's :class:`app.jobs.Job` for ``d``, if the app started it.
        held: :func:`open_logs` (None: no procfs).
        now: the time to measure a running run's duration to (default: now).
    """
    now = time.time() if now is None else now
    s = RunSummary(name, d, state="")
    try:
        _read_into(s, d, job, held, now)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:  # UnicodeDecodeError is a ValueError
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        s.state = f"unreadable: {why}"
    return s


def _read_into(s: RunSummary, d: Path, job: Any, held: set[str] | None, now: float) -> None:
    cfg_file = d / rundir.CONFIG_FILE
    has_config = cfg_file.is_file()
    if has_config:
        info = rundir.RunInfo.read(d)
        s.task, s.adapter = info.task_name, info.adapter_name
        s.backbone = info.backbone.spec or str(info.config.get("backbone", {}).get("name", ""))
        s.trainable = info.parameters.get("trainable")
        s.trainable_no_head = info.parameters.get("trainable_no_head")
        s.started = _mtime(cfg_file) or 0.0
    try:
        records = [r for r in rundir.read_metrics(d) if isinstance(r, dict)]
    except (OSError, ValueError) as e:
        raise ValueError(f"{rundir.METRICS_FILE}: {e}") from None
    s.records = records
    last: dict[str, dict[str, Any]] = {}
    for r in records:
        if isinstance(r.get("split"), str):
            last[r["split"]] = r
    s.metric = headline(last["val"]) if "val" in last else (headline(last["test"]) if "test" in last else "") or ""
    for split in ("val", "test"):
        v = last.get(split, {}).get(s.metric)
        setattr(s, split, float(v) if isinstance(v, (int, float)) else None)
    final = _read_json(d / rundir.FINAL_FILE)
    trial = _read_json(d / TRIAL_STATE_FILE)
    running = _alive(d, held, now)
    if job is not None:
        s.state = JOB_STATES.get(job.status, job.status)
    elif trial.get("state") in TRIAL_STATES:
        s.state = TRIAL_STATES[trial["state"]]
    elif final:
        s.state = "done"
    elif running:
        s.state = "running"
    elif not has_config:
        raise ValueError(
            f"no {rundir.CONFIG_FILE} in {d}: not a run directory, or its training stopped before writing it"
        )
    else:
        s.state = "interrupted"
    timing = final.get("timing") if isinstance(final.get("timing"), dict) else {}
    if isinstance(timing.get("train_seconds"), (int, float)):
        s.duration = float(timing["train_seconds"])
    elif s.started:
        steps = [r["time"] for r in records if "split" not in r and isinstance(r.get("time"), (int, float))]
        end = now if s.state == "running" else (steps[-1] if steps else None)
        s.duration = max(0.0, end - s.started) if end is not None else None
    if not s.started:
        s.started = (job.created if job is not None else None) or _mtime(d) or 0.0


def _read_json(p: Path) -> dict[str, Any]:
    """A JSON object file ({} when absent). Raises ValueError naming the file when it is damaged."""
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p.name} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p.name} holds {type(data).__name__}, not a JSON object")
    return data


def summarise_all(runs_root: Path, jobs: list[Any] = ()) -> list[RunSummary]:
    """Every run under ``runs_root`` (newest first), with the app's ``jobs`` (also those whose folder does not exist
    yet: a queued job)."""
    by_dir = {str(Path(j.run_dir).resolve()): j for j in jobs}
    held, now = open_logs(), time.time()
    rows = []
    for name, d in find_runs(runs_root):
        rows.append(summarise(name, d, by_dir.pop(str(d.resolve()), None), held, now))
    for j in by_dir.values():  # jobs that have no folder yet (queued) or whose folder went away
        rows.append(RunSummary(j.id, Path(j.run_dir), JOB_STATES.get(j.status, j.status), task=j.task,
                               started=j.created))  # fmt: skip
    rows.sort(key=lambda r: r.started, reverse=True)
    return rows


def table(rows: list[RunSummary]) -> pd.DataFrame:
    return pd.DataFrame([r.row() for r in rows], columns=COLUMNS, dtype=object)  # object: a missing number stays None


def curves(rows: list[RunSummary], names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The chosen runs' training loss and validation headline metric against step, one ``run`` per curve, and the
    metric's name(s) for the plot title."""
    by_name = {r.name: r for r in rows}
    loss, metric, metric_names = [], [], []
    for n in names:
        r = by_name.get(n)
        if r is None:
            continue
        for rec in r.records:
            if "split" not in rec and isinstance(rec.get("loss"), (int, float)) and "step" in rec:
                loss.append({"step": rec["step"], "loss": float(rec["loss"]), "run": n})
            elif rec.get("split") == "val" and r.metric and isinstance(rec.get(r.metric), (int, float)):
                metric.append({"step": rec["step"], "value": float(rec[r.metric]), "run": n})
        if r.metric and r.metric not in metric_names:
            metric_names.append(r.metric)
    return (
        pd.DataFrame(loss, columns=["step", "loss", "run"]),
        pd.DataFrame(metric, columns=["step", "value", "run"]),
        " / ".join(metric_names) or "metric",
    )


def run_colours(n: int) -> list[Any]:
    """``n`` distinct colours: tab10, tab20 for more runs, evenly spaced on turbo beyond 20."""
    if n <= 20:
        cmap = colormaps["tab10" if n <= 10 else "tab20"]
        return [cmap(i) for i in range(n)]
    return [colormaps["turbo"](i / (n - 1)) for i in range(n)]


def curve_figure(rows: list[RunSummary], names: list[str]) -> Figure | None:
    """Training loss (left) and the validation headline metric (right) against step, one colour per chosen run
    (the same colour in both panels); None when no run is chosen. A matplotlib figure (no pyplot: handlers run in
    threads)."""
    loss, metric, mname = curves(rows, names)
    if loss.empty and metric.empty:
        return None
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    ax_loss, ax_val = fig.subplots(1, 2)
    palette = run_colours(len(names))
    for n, colour in zip(names, palette, strict=True):
        for ax, df, col in ((ax_loss, loss, "loss"), (ax_val, metric, "value")):
            part = df[df["run"] == n]
            if not part.empty:
                ax.plot(part["step"], part[col], color=colour, label=n, marker="o" if len(part) < 3 else None)
    for ax, title, ylabel in ((ax_loss, "training loss", "loss"), (ax_val, f"val {mname} vs step", f"val {mname}")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    return fig


def keep_selection(wanted: list[str] | None, rows: list[RunSummary]) -> list[str]:
    """The chosen runs that still exist; when none does, the active runs, else the newest run."""
    names = [r.name for r in rows]
    kept = [n for n in (wanted or []) if n in names]
    return kept or [r.name for r in rows if r.active] or names[:1]


# -- the tab -------------------------------------------------------------------------------------------------------
def selection_store() -> gr.BrowserState:
    """The chosen runs in the browser's localStorage, so they survive a page reload. Build it at the page's top
    level, outside every tab: a tab's contents mount only when the tab is first opened, and a store inside the
    Runs tab would hand the page-load event its empty default instead of the saved choice."""
    return gr.BrowserState([], storage_key=SELECTION_KEY)


def runs_tab(demo: gr.Blocks, state: Any, stored: gr.BrowserState) -> None:
    """Build the Runs tab inside the current ``gr.Tab`` (``state``: :class:`app.main.AppState`; ``stored``: the
    page-level :func:`selection_store`)."""
    gr.Markdown("Every run directory under the runs root (sweep trials included). Click a header to sort; choose "
                "runs below to overlay their curves.")  # fmt: skip
    session = gr.State({"active": False, "names": []})
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="runs-refresh", scale=0)
        summary = gr.Markdown(elem_id="runs-summary")
    grid = gr.Dataframe(headers=COLUMNS, datatype=DATATYPES, interactive=False, label="runs", elem_id="runs-table")
    pick = gr.Dropdown([], value=[], multiselect=True, label="compare runs", elem_id="runs-pick")
    plot = gr.Plot(label="curves of the chosen runs", elem_id="runs-curves")
    timer = gr.Timer(2.0)

    def scan() -> list[RunSummary]:
        return summarise_all(state.runs_root, state.jobs.list())

    def counts(rows: list[RunSummary]) -> str:
        by: dict[str, int] = {}
        for r in rows:
            key = "unreadable" if r.state.startswith("unreadable") else r.state
            by[key] = by.get(key, 0) + 1
        return f"{len(rows)} runs in `{state.runs_root}`: " + ", ".join(f"{n} {k}" for k, n in sorted(by.items()))

    def full(wanted: list[str] | None, sess: dict[str, Any]):
        rows = scan()
        names = [r.name for r in rows]
        chosen = keep_selection(wanted, rows)
        sess = {"active": any(r.active for r in rows), "names": names}
        return (table(rows), gr.Dropdown(choices=names, value=chosen), curve_figure(rows, chosen), counts(rows), sess,
                chosen)  # fmt: skip

    outputs = [grid, pick, plot, summary, session, stored]

    def on_tick(wanted: list[str] | None, sess: dict[str, Any]):
        jobs_active = any(j.status in ("queued", "starting", "running") for j in state.jobs.list())
        if not (sess or {}).get("active") and not jobs_active:
            return tuple(gr.skip() for _ in outputs)
        out = list(full(wanted, sess))
        if out[4]["names"] == (sess or {}).get("names"):
            out[1] = gr.skip()  # same runs: leave the dropdown alone (it may be open)
        return tuple(out)

    def on_pick(names: list[str] | None):
        rows = scan()
        return curve_figure(rows, names or []), names or []

    demo.load(full, [stored, session], outputs, api_name="runs_reattach")
    refresh.click(full, [pick, session], outputs, api_name="runs_refresh")
    timer.tick(on_tick, [pick, session], outputs, show_progress="hidden")
    # always_last: a second choice made while the first one's curves are drawn is not dropped (Gradio's default
    # trigger mode ignores events that arrive while one is pending, so the saved choice would miss it)
    pick.input(on_pick, [pick], [plot, stored], api_name="runs_curves", trigger_mode="always_last")
