"""A sweep's study: its storage (SQLite in the sweep folder, or any SQLAlchemy URL), the queue of trials, the
heartbeat/retry policy, the sweep-folder files and a trial's state file — what workers and the leaderboard share.

The sweep folder's names (``study.db``, ``recipe.yaml``, ``space.yaml``, ``trials/<n>/``, ``best.json``) and the
trial state file ``sweep_trial.json`` are owned here; :mod:`vision_peft.sweep` runs workers and trials on top.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import sqlalchemy
from optuna.trial import TrialState

from vision_peft import rundir

log = logging.getLogger("vision_peft")

if TYPE_CHECKING:  # the space module imports the registries (torch): only where a space is read
    from vision_peft.sweep_space import Space


STATE_FILE = rundir.SWEEP_TRIAL_STATE_FILE  # the sweep folder's names: owned by vision_peft.rundir
DB_FILE = rundir.SWEEP_DB_FILE
RECIPE_FILE = rundir.SWEEP_RECIPE_FILE
SPACE_FILE = rundir.SWEEP_SPACE_FILE
BEST_FILE = rundir.SWEEP_BEST_FILE
TRIALS_DIR = rundir.SWEEP_TRIALS_DIR
HEARTBEAT_S = 10  # seconds between heartbeats of a RUNNING trial; a trial silent for 3× this is stale
POLL_S = 0.5  # how often a worker reads its trial's metrics.jsonl

optuna.logging.set_verbosity(optuna.logging.WARNING)


class SweepError(ValueError):
    """A sweep that cannot run as asked; the message says why and what to do."""


# -- storage and study -------------------------------------------------------------------------------------------
def storage_url(sweep_dir: Path, storage: str | None) -> str:
    """The given SQLAlchemy URL, or the embedded default: ``sqlite:///<sweep dir>/study.db``."""
    return storage or f"sqlite:///{(sweep_dir / DB_FILE).resolve()}"


def redact(url: str) -> str:
    """The URL as messages and printed results show it: its password masked."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy parses: mask whatever looks like user:password@
        return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


def _engine(url: str) -> tuple[str, dict[str, Any]]:
    """The URL given to SQLAlchemy and its engine settings. A bare ``postgresql://`` uses psycopg 3 (the
    ``postgres`` extra); a PostgreSQL connection gives up after 10 s (unless the URL sets ``connect_timeout``) and is
    pinged before reuse (a long-lived worker survives a server restart or a dropped idle connection)."""
    try:
        u = sqlalchemy.engine.make_url(url)
    except Exception:  # RDBStorage raises the parse error, reported by open_storage
        return url, {}
    if u.get_backend_name() == "sqlite":
        return url, {"connect_args": {"timeout": 60}}
    if u.get_backend_name() != "postgresql":
        return url, {}
    if u.drivername == "postgresql":
        url = u.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url, {"pool_pre_ping": True, "connect_args": {} if "connect_timeout" in u.query else {"connect_timeout": 10}}


def _open_error(url: str, e: Exception) -> str:
    """One line: which storage (password masked), what went wrong, and the fix."""
    safe, cause = redact(url), e.__cause__ if isinstance(e, ImportError) and e.__cause__ else e
    postgres = url.startswith("postgresql")
    if isinstance(cause, ImportError):  # optuna wraps the driver's ImportError
        fix = 'pip install "vision_peft[postgres]" (psycopg 3, for postgresql:// and postgresql+psycopg:// URLs)' if postgres else "install the driver the URL names"
        return f"storage {safe} cannot be opened: its database driver is missing ({cause}); {fix}"
    if isinstance(e, sqlalchemy.exc.OperationalError) and not url.startswith("sqlite"):
        detail = " ".join(str(getattr(e, "orig", None) or e).split())
        password = sqlalchemy.engine.make_url(url).password
        detail = detail.replace(str(password), "***") if password else detail
        return (f"storage {safe} cannot be opened: the database server cannot be reached or refused the login "
                f"({detail}); start the server (it must listen on that host and port), or fix the host, port, user, "
                "password or database name in the URL")  # fmt: skip
    return f"storage {safe} cannot be opened: {type(e).__name__}: {' '.join(str(e).split())}"


def open_storage(url: str, heartbeat_s: int = HEARTBEAT_S) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats and the retry-once policy for trials whose worker died.

    Raises:
        SweepError: the URL cannot be reached, lacks its driver or is not a database URL (one line: the URL with its
            password masked, the cause, the fix).
    """
    engine_url, kwargs = _engine(url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                engine_url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s, grace_period=3 * heartbeat_s,
                heartbeat_stale_trial_callback=_on_stale_trial,
            )  # fmt: skip
    except Exception as e:  # sqlalchemy raises many kinds (ArgumentError, OperationalError, ImportError of a driver)
        raise SweepError(_open_error(url, e)) from None


def _on_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose worker stopped beating: mark its run directory failed, queue one retry."""
    run_dir = trial.user_attrs.get("run_dir")
    if run_dir and Path(run_dir).is_dir():
        write_state(Path(run_dir), "failed", "its worker died (no heartbeat); retried once as a new trial")
    retry_once(study, trial)


def retry_once(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a copy of a FAIL trial (same parameters) unless it is itself a retry (optuna's retry callback)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    retry(study, trial)


def write_state(run_dir: Path, state: str, reason: str = "", **extra: Any) -> str:
    """``sweep_trial.json`` in a trial's run directory (atomic). A failed write (disk full) must not keep the trial
    from being told to the study, so it is logged and returned ("" when written): the study records the state."""
    try:
        rundir.atomic_write_json(run_dir / STATE_FILE, {"state": state, "reason": reason, "time": time.time(), **extra})
    except OSError as e:  # rundir.WriteError names the file, the cause and the fix
        log.warning("sweep: %s", e)
        return str(e)
    return ""


def read_state(run_dir: Path) -> dict[str, Any]:
    """A trial run directory's ``sweep_trial.json`` ({} when absent or unreadable)."""
    try:
        return json.loads((Path(run_dir) / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _pruner(space: Space) -> optuna.pruners.BasePruner:
    if space.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=space.pruner_startup, n_warmup_steps=space.pruner_warmup)
    if space.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def load_study(url: str, name: str, seed: int = 0, heartbeat_s: int = HEARTBEAT_S) -> optuna.Study:
    """An existing study (for ``--join`` and the leaderboard), with the sampler and pruner its space names.

    Raises:
        SweepError: no such study in the storage (the message lists the studies it holds).
    """
    storage = open_storage(url, heartbeat_s)
    names = [s.study_name for s in storage.get_all_studies()]
    if name not in names:
        there = ", ".join(names) or "none"
        raise SweepError(f"storage {redact(url)!r} holds no study {name!r}; studies there: {there}")
    attrs = optuna.load_study(study_name=name, storage=storage).user_attrs
    pruner: optuna.pruners.BasePruner = optuna.pruners.NopPruner()
    if "space_text" in attrs and "recipe_text" in attrs:
        pruner = _pruner(_stored_space(attrs))
    return optuna.load_study(
        study_name=name, storage=storage, sampler=optuna.samplers.TPESampler(seed=attrs.get("seed", seed)),
        pruner=pruner,
    )  # fmt: skip


def _stored_space(attrs: dict[str, Any]) -> Space:
    """The space a study was made with, parsed against its stored recipe (from temp copies: nothing else is read)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / RECIPE_FILE).write_text(attrs["recipe_text"])
        (Path(d) / SPACE_FILE).write_text(attrs["space_text"])
        from vision_peft.sweep_space import load_space

        return load_space(Path(d) / SPACE_FILE, Path(d) / RECIPE_FILE, preflight=False)


@dataclass
class Context:
    """What a worker needs to run trials of one study."""

    study: optuna.Study
    sweep_dir: Path
    recipe_file: Path
    space: Space
    seed: int
    hidden_test: int | None  # the recipe's test count when trials train without the test split
    device: str | None  # train.device override for the trials (None: the recipe's)
    deadline: float | None  # no new trial after this time (epoch seconds)

    @property
    def trials_dir(self) -> Path:
        return self.sweep_dir / TRIALS_DIR


def _hidden_test(rdata: dict[str, Any]) -> int | None:
    """The recipe's test count when ``task.split`` ends with ``test`` (trials then train with test=0)."""
    split = (rdata.get("task") or {}).get("split") if isinstance(rdata.get("task"), dict) else None
    if isinstance(split, dict) and split and list(split)[-1] == "test" and split["test"] != 0:
        return int(split["test"])
    return None


def prepare_study(
    recipe: str | Path,
    space_file: str | Path,
    trials: int,
    sweep_dir: str | Path | None = None,
    storage: str | None = None,
    study: str | None = None,
    seed: int = 0,
) -> tuple[str, str, Path]:
    """Validate, create or load the study, check it belongs to this recipe and space, fill the queue to ``trials``.

    Returns:
        (storage URL, study name, sweep dir).

    Raises:
        SpaceError: the space file is bad (before anything is written).
        SweepError: the study belongs to another recipe or space, or the storage cannot be reached.
    """
    if trials < 1:
        raise SweepError(f"--trials must be positive, got {trials}")
    from vision_peft.sweep_space import load_space, recipe_data

    recipe_path, rdata = recipe_data(recipe)
    space = load_space(space_file, recipe_path)
    name = study or f"{recipe_path.stem}-{Path(space_file).stem}"
    sweep_dir = Path(sweep_dir) if sweep_dir else Path("runs") / "sweeps" / name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    url = storage_url(sweep_dir, storage)
    rtext = recipe_path.read_text()
    want = {"recipe": str(recipe_path), "recipe_text": rtext, "space_text": space.text, "seed": seed}
    st = optuna.create_study(
        study_name=name, storage=open_storage(url), direction=space.direction, load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=seed), pruner=_pruner(space),
    )  # fmt: skip
    attrs = st.user_attrs
    if "recipe_text" not in attrs:
        for k, v in {**want, "sweep_dir": str(sweep_dir.resolve()), "hidden_test": _hidden_test(rdata)}.items():
            st.set_user_attr(k, v)
    else:
        if attrs["recipe_text"] != rtext:
            raise SweepError(
                f"study {name!r} in {redact(url)} belongs to recipe {attrs['recipe']!r} (stored with the study), not "
                f"{str(recipe_path)!r} as it is now; give another --study name, or sweep the stored recipe "
                f"({sweep_dir / RECIPE_FILE})"
            )
        if attrs["space_text"] != space.text:
            raise SweepError(
                f"study {name!r} in {redact(url)} was made with another space file (stored: {sweep_dir / SPACE_FILE}); "
                "give another --study name to sweep this space"
            )
    rundir.atomic_write_text(sweep_dir / RECIPE_FILE, rtext)
    rundir.atomic_write_text(sweep_dir / SPACE_FILE, space.text)
    _fill_queue(st, space, trials)
    return url, name, sweep_dir


def _fill_queue(study: optuna.Study, space: Space, trials: int) -> None:
    """Queue WAITING trials until the study holds ``trials`` (a FAIL trial that was retried does not count)."""
    all_trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in all_trials if "failed_trial" in t.system_attrs}
    used = sum(1 for t in all_trials if not (t.state == TrialState.FAIL and t.number in retried))
    for slot in range(used, trials):
        params = (
            {"adapter.name": space.methods[slot % len(space.methods)]} if space.method_order == "round_robin" else {}
        )
        study.enqueue_trial(params, user_attrs={"slot": slot})


def budget_done(study: optuna.Study) -> tuple[int, int]:
    """(finished trials that count against the budget, budget) of a study."""
    ts = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in ts if "failed_trial" in t.system_attrs}
    counted = [t for t in ts if not (t.state == TrialState.FAIL and t.number in retried)]
    return sum(1 for t in counted if t.state.is_finished()), len(counted)


def make_context(url: str, name: str, sweep_dir: str | Path | None = None, device: str | None = None,
                 deadline: float | None = None, heartbeat_s: int = HEARTBEAT_S) -> Context:  # fmt: skip
    """A worker's view of a study: the recipe and space come from the study itself (written into the sweep dir)."""
    study = load_study(url, name, heartbeat_s=heartbeat_s)
    attrs = study.user_attrs
    if "recipe_text" not in attrs:
        raise SweepError(f"study {name!r} in {redact(url)} was not made by vision_peft sweep (no recipe stored)")
    sdir = Path(sweep_dir) if sweep_dir else Path(attrs["sweep_dir"])
    sdir.mkdir(parents=True, exist_ok=True)
    recipe_file, space_file = sdir / RECIPE_FILE, sdir / SPACE_FILE
    for f, text in ((recipe_file, attrs["recipe_text"]), (space_file, attrs["space_text"])):
        if not f.is_file() or f.read_text() != text:
            rundir.atomic_write_text(f, text)
    from vision_peft.sweep_space import load_space

    space = load_space(space_file, recipe_file, preflight=False)
    return Context(study, sdir, recipe_file, space, int(attrs.get("seed", 0)), attrs.get("hidden_test"), device,
                   deadline)  # fmt: skip


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
