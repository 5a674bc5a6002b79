"""TensorBoard event files of a run directory: ``<run_dir>/tensorboard/``, so that ``tensorboard --logdir runs``
shows every run.

Every ``metrics.jsonl`` record is written again as scalars: a training-step record as ``train/<key>`` (loss, lr,
step_time, epoch, the adapter's step-hook values …; the x-axis is its ``step``, the wall time its ``time``), an
evaluation record (``"split"`` key) as ``<split>/<metric>`` (``val/top1``, ``test/loss`` …). A fresh run also
writes the parameter counts and its recipe as text, and the finished run its hyper-parameters and final metrics
for the HPARAMS tab. Only the process that writes ``metrics.jsonl`` writes here (rank 0 under torchrun).

A resume starts a new event file with ``purge_step`` = the checkpoint step + 1: TensorBoard then drops what the
interrupted run had logged after its checkpoint, as :func:`vision_peft.rundir.truncate_metrics` does for
``metrics.jsonl``, so no step appears twice. Every record is flushed at once, and a write that fails (disk full,
size limit; in the writer's thread too) raises the :class:`~vision_peft.rundir.WriteError` of any run-directory file,
naming the event file and saying that ``train.tensorboard=false`` runs without it. The run then stops as it does when
``metrics.jsonl`` cannot be written: the record is in ``metrics.jsonl``, the last checkpoint is intact, and
``train --resume <run>`` (with ``--train.tensorboard=false`` while the disk is still full) continues it.

``tensorboard`` is imported only when a writer is opened (``--help``, predict and export never pay for it).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from vision_peft import rundir

SKIP_KEYS = ("step", "time", "total_steps", "split")  # the x-axis, the wall time, a constant, the record kind


class TBLog:
    """The event-file writer of one run (every method is a no-op when TensorBoard logging is off)."""

    def __init__(self, run_dir: str | Path | None, purge_step: int | None = None) -> None:
        """Open a writer on ``<run_dir>/tensorboard/`` (None: a no-op log); ``purge_step`` on resume."""
        self.folder = Path(run_dir) / rundir.TB_DIR if run_dir is not None else None
        self._writer = None
        if self.folder is None:
            return
        with self._guard():
            from torch.utils.tensorboard import SummaryWriter

            _quiet_writer_threads()
            self._writer = SummaryWriter(str(self.folder), purge_step=purge_step, flush_secs=3600)

    @property
    def enabled(self) -> bool:
        return self._writer is not None

    def record(self, rec: dict[str, Any]) -> None:
        """Write one ``metrics.jsonl`` record (a step, or an evaluation with a ``"split"``) and flush it."""
        if self._writer is None:
            return
        prefix = rec.get("split") or "train"
        step, walltime = int(rec["step"]), rec.get("time")
        with self._guard():
            for k, v in rec.items():
                if k not in SKIP_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._writer.add_scalar(f"{prefix}/{k}", v, step, walltime=walltime)
            self._writer.flush()

    def start(self, counts: dict[str, int], recipe_text: str) -> None:
        """A fresh run's text entries at step 0: the parameter counts (a table) and the resolved recipe."""
        if self._writer is None:
            return
        table = ["| parameters | count |", "|---|---|", *(f"| {k} | {v:,} |" for k, v in counts.items())]
        with self._guard():
            self._writer.add_text("parameters", "\n".join(table), 0)
            self._writer.add_text("recipe", "\n".join("    " + ln for ln in recipe_text.splitlines()), 0)
            self._writer.flush()

    def hparams(self, config: dict[str, Any], counts: dict[str, int], final: dict[str, Any], step: int) -> None:
        """The HPARAMS-tab entry of a finished run: its flattened config and parameter counts, with the final
        split metrics (already written as ``<split>/<metric>`` scalars) as its metrics."""
        if self._writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        hp = {f"parameters/{k}": v for k, v in counts.items()}
        for section, values in config.items():
            for k, v in (values or {}).items():
                hp[f"{section}.{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
        metrics = {
            f"{split}/{k}": v
            for split in ("val", "test")
            for k, v in (final.get(split) or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        with self._guard():
            for summary in hparams(hp, metrics):
                self._writer.file_writer.add_summary(summary, step)
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file (raises a WriteError when the last write fails)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            with self._guard():
                writer.close()

    def abandon(self) -> None:
        """Close without raising: the run already stops with an error of its own."""
        try:
            self.close()
        except OSError:
            pass

    def _guard(self):
        return _WriteGuard(self)

    def event_file(self) -> Path | None:
        """The event file being written (the folder when the writer does not say)."""
        name = getattr(getattr(getattr(self._writer, "file_writer", None), "event_writer", None), "_file_name", None)
        return Path(name) if name else self.folder


class _WriteGuard:
    """Turn an OSError of the writer (raised here, or in its writer thread and re-raised at the next call) into
    the run directory's WriteError naming the event file."""

    def __init__(self, log: TBLog) -> None:
        self.log = log

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp, e, tb) -> bool:
        if e is None or isinstance(e, rundir.WriteError):
            return False
        err = rundir.os_error_in(e)
        if err is not None:
            raise rundir.write_error(self.log.event_file() or self.log.folder, err, _off_hint(self.log.folder)) from e
        return False


def _off_hint(folder: Path | None) -> str:
    """What a failed event-file write tells the user besides the cause: the events are a copy, and can be off."""
    return (
        f"the TensorBoard events in {folder} only repeat metrics.jsonl: add --train.tensorboard=false to the train "
        "(or train --resume) command to go on without them"
    )


_HOOK_LOCK = threading.Lock()
_HOOKED: list[bool] = []


def _quiet_writer_threads() -> None:
    """The writer's background thread dies with an OSError when a write fails and Python prints its traceback;
    the error reaches the user once, as a WriteError at the next call, so that traceback is not printed. Other
    threads' exceptions go to the hook that was installed before."""
    try:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    except ImportError:  # another tensorboard layout: the traceback is printed, nothing else changes
        return
    with _HOOK_LOCK:
        if _HOOKED:
            return
        previous = threading.excepthook

        def hook(args: threading.ExceptHookArgs) -> None:
            if isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError):
                return
            previous(args)

        threading.excepthook = hook
        _HOOKED.append(True)


def open_log(run_dir: Path | None, enabled: bool, resume_step: int | None) -> TBLog:
    """The run's TensorBoard log: a writer on ``<run_dir>/tensorboard/`` when ``enabled`` and ``run_dir`` is this
    process's to write (None on the other ranks), else a no-op log. ``resume_step``: the checkpoint step a resume
    continues from (the events after it are purged)."""
    if not enabled or run_dir is None:
        return TBLog(None)
    return TBLog(run_dir, purge_step=None if resume_step is None else resume_step + 1)
