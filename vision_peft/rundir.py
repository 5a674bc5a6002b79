"""The run-directory contract: file names, ``config.json`` as a typed, versioned :class:`RunInfo`, the
``metrics.jsonl`` stream, the model card, and the atomic writes they all use.

A run directory (written by :func:`vision_peft.train.run`) holds::

    config.json           RunInfo: format, resolved config, backbone (spec, weight hash, data_config), task state,
                          parameter counts, device/amp, steps, versions
    recipe.yaml           the resolved recipe (after the command-line overrides) that reproduces the run:
                          `python -m vision_peft train <run_dir>/recipe.yaml` trains the same config into a new run
                          directory (see :func:`write_recipe`)
    adapter.safetensors   only what was trained (adapter tensors + head); written at the end
    metrics.jsonl         one JSON object per logged step and per evaluation (``"split"`` key)
    tensorboard/          the same records as TensorBoard event files (``tensorboard --logdir runs``), unless
                          ``train.tensorboard`` is false (see :mod:`vision_peft.tb_log`)
    train.log             the engine's log
    checkpoint/           state.pt + meta.json of the latest checkpoint for ``--resume``, and previous/ holding the
                          one before it (a run directory with only the latest still resumes; see
                          :mod:`vision_peft.checkpoint`)
    split.json            the data split, when the task has one
    final_metrics.json    final val/test metrics and timing
    README.md             a short model card

Torch-free (the app reads run directories without loading a model). ``config.json`` without a ``format`` key is
format 1, as written by every vision_peft before this module existed; its keys are exactly :class:`RunInfo`'s.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vision_peft.config import ConfigError, build_dataclass

CONFIG_FILE = "config.json"
RECIPE_FILE = "recipe.yaml"  # the contract with the app: `python -m vision_peft train <run_dir>/recipe.yaml`
TB_DIR = "tensorboard"
ADAPTER_FILE = "adapter.safetensors"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"
CKPT_DIR = "checkpoint"
PREV_CKPT_DIR = "previous"  # checkpoint/previous/: the checkpoint before the latest one
CARD_FILE = "README.md"
SPLIT_FILE = "split.json"
FINAL_FILE = "final_metrics.json"
# a sweep folder (vision_peft.sweep_study writes it; the app's Runs tab reads it without importing optuna)
SWEEP_DB_FILE = "study.db"
SWEEP_RECIPE_FILE = "recipe.yaml"
SWEEP_SPACE_FILE = "space.yaml"
SWEEP_BEST_FILE = "best.json"
SWEEP_TRIALS_DIR = "trials"
SWEEP_TRIAL_STATE_FILE = "sweep_trial.json"  # in a trial's run directory: complete | pruned | stopped | failed, and why

RUN_FORMAT = "vision_peft.run/1"  # config.json's format; absent = 1 (run directories written before it was recorded)
KNOWN_FORMATS = (RUN_FORMAT,)


class CheckpointError(ValueError):
    """A checkpoint or run directory that cannot be loaded as asked; the message says why and what to do."""


# -- atomic writes ------------------------------------------------------------------------------------------
class WriteError(OSError):
    """A file could not be written (disk full, file-size limit, read-only or missing folder …). The message names
    the file, the cause and the fix; the file's previous version, if any, is untouched (writes are atomic).
    ``errno`` is the OS error's (ENOSPC, EFBIG …) and ``filename`` the path."""

    def __init__(self, message: str, code: int, path: str) -> None:
        super().__init__(message)
        self.message = message
        self.errno = code
        self.filename = path

    def __str__(self) -> str:
        return self.message


_WRITE_FIXES = {
    errno.ENOSPC: "the disk is full: free space on that filesystem (see `df -h {folder}`)",
    errno.EDQUOT: "the disk quota is exhausted: free space or raise the quota",
    errno.EFBIG: "the file is larger than this process may write (the shell's `ulimit -f` or the filesystem's "
    "maximum file size): raise the limit or write to another filesystem",
    errno.EROFS: "the filesystem is read-only: write to another folder",
    errno.EACCES: "permission denied: make {folder} writable",
}


def write_error(path: str | Path, e: OSError, then: str = "") -> WriteError:
    """A :class:`WriteError` for ``e`` raised while writing ``path``: names the path, the errno and the fix;
    ``then`` is appended (e.g. how to resume)."""
    if isinstance(e, WriteError):
        return WriteError(f"{e.message}; {then}" if then else e.message, e.errno, e.filename)
    code = e.errno or 0
    name = errno.errorcode.get(code, "error")
    fix = _WRITE_FIXES.get(code, "check the folder exists and is writable").format(folder=Path(path).parent)
    msg = f"could not write {path}: {e.strerror or e} ({name}); {fix}. Its previous version is untouched"
    return WriteError(msg + (f"; {then}" if then else ""), code, str(path))


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temp file next to ``path``, fsync it, then rename it into place (never a
    half-written file under ``path``; the rename is made durable by an fsync of the folder).

    Raises:
        WriteError: the disk is full, a size limit was hit, … (an ``OSError`` naming ``path``, the cause and the
            fix); the temp file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise write_error(path, e) from e
    try:
        write(tmp)
        _fsync_file(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        err = os_error_in(e)
        if err is not None:
            raise write_error(path, err) from e
        raise


def os_error_in(e: BaseException) -> OSError | None:
    """The ``OSError`` behind ``e`` (itself, or along its ``__cause__`` / ``__context__`` chain: writers such as
    torch.save or safetensors wrap the OS error in their own exception), or None."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno is not None:
            return cur
        cur = cur.__cause__ or cur.__context__
    text = str(e)
    for code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):  # an errno only reported in a wrapped message
        if os.strerror(code) in text:
            return OSError(code, os.strerror(code))
    return None


def _fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename inside ``folder`` durable (best effort: some filesystems cannot fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to a temp file next to ``path`` and rename it into place."""

    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, w)  # fsyncs the temp file before the rename


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (values JSON cannot hold are written as strings)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


# -- config.json --------------------------------------------------------------------------------------------
@dataclass
class BackboneInfo:
    """The frozen backbone a run was trained on: what loading it again must reproduce."""

    spec: str = ""  # registry spec, e.g. "timm:vit_small_patch16_224"
    weights_id: str = ""  # sha256 of the weights' content (predict refuses other weights)
    weights_source: str = ""  # where the weights came from (a file, a cache, "random init")
    data_config: dict[str, Any] = field(default_factory=dict)  # preprocessing: input_size, mean, std …
    embed_dim: int = 0  # size of the backbone's feature output


@dataclass
class StepsInfo:
    """The optimizer-step schedule of a run."""

    total: int = 0  # optimizer steps of the whole run
    per_epoch: int = 0  # optimizer steps per epoch (after sharding and accumulation)


@dataclass
class RunInfo:
    """``config.json`` of a run directory: the resolved config plus the facts that must travel with the run."""

    format: str = RUN_FORMAT  # "vision_peft.run/<version>"
    vision_peft_version: str = ""  # package version that trained the run
    config: dict[str, Any] = field(default_factory=dict)  # RunConfig.to_dict(); recipe.build_run_config reverses it
    backbone: BackboneInfo = field(default_factory=BackboneInfo)
    task_state: dict[str, Any] = field(default_factory=dict)  # Task.state_info(): class names, extra encoders …
    parameters: dict[str, int] = field(default_factory=dict)  # trainable / trainable_no_head / head / totals
    adapter_touched: list[str] = field(default_factory=list)  # the first 50 modules the adapter changed
    device: str = "cpu"  # the device it trained on
    amp: str = "none"  # the autocast dtype it trained with (none | bfloat16 | float16)
    world_size: int = 1  # data-parallel processes
    steps: StepsInfo = field(default_factory=StepsInfo)
    torch: str = ""  # torch version that trained the run

    @property
    def task_name(self) -> str:
        """The run's task (registry name)."""
        return self.config["task"]["name"]

    @property
    def adapter_name(self) -> str:
        """The run's adapter (registry name)."""
        return self.config["adapter"]["name"]

    @property
    def classes(self) -> list[str]:
        """Class names in logit order (empty when the task has none)."""
        return list(self.task_state.get("classes", []))

    def to_dict(self) -> dict[str, Any]:
        """Plain data, keys in file order."""
        return dataclasses.asdict(self)

    def write(self, run_dir: str | Path) -> Path:
        """Atomically write ``<run_dir>/config.json``; returns its path."""
        path = Path(run_dir) / CONFIG_FILE
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = CONFIG_FILE) -> RunInfo:
        """Validate ``config.json`` data (format absent = 1); ``source`` names the file in errors."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{source} must hold a JSON object, got {type(data).__name__}; re-train the run")
        data = {"format": RUN_FORMAT, **data}
        if data["format"] not in KNOWN_FORMATS:
            raise CheckpointError(
                f"{source} has format {data['format']!r}; this vision_peft reads {', '.join(KNOWN_FORMATS)}. "
                "Load it with the vision_peft version that wrote it, or upgrade vision_peft"
            )
        if not isinstance(data.get("config"), dict) or not isinstance(data["config"].get("task"), dict):
            raise CheckpointError(
                f"{source} has no resolved 'config' section; it is not a vision_peft run's config.json"
            )
        try:
            return build_dataclass(cls, data, "config.json")
        except ConfigError as e:
            raise CheckpointError(f"{source} does not fit the run-directory format {data['format']}: {e}") from None

    @classmethod
    def read(cls, run_dir: str | Path) -> RunInfo:
        """Read ``<run_dir>/config.json`` (``run_dir`` may also be the path of that file).

        Raises:
            CheckpointError: the file is missing, is not JSON, or does not fit the format; the message names the
                file and what to do.
        """
        path = Path(run_dir) if Path(run_dir).is_file() else Path(run_dir) / CONFIG_FILE
        if not path.is_file():
            raise CheckpointError(
                f"{run_dir} is not a run directory ({path} is missing); train one with "
                "`python -m vision_peft train <recipe>` or point at the folder that holds config.json"
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}); restore it or re-train the run") from None
        return cls.from_dict(data, str(path))


def write_recipe(run_dir: str | Path, config: dict[str, Any], version: str = "") -> Path:
    """Atomically write ``<run_dir>/recipe.yaml``: the resolved ``config`` (``RunConfig.to_dict()``) as a recipe that
    trains the same configuration again, with ``output.name`` cleared so that a copy run anywhere makes a new run
    directory instead of refusing (or touching) this one; returns its path.

    Relative paths in it (``task.data_root``, ``backbone.weights`` …) are kept as written: they resolve the way
    every recipe's do (data paths: the working directory, then ``$VISION_PEFT_DATA``), so the file works on another
    machine with the same data root. The header comment says all this to whoever opens the file.
    """
    run_dir = Path(run_dir)
    data = json.loads(json.dumps(config))  # a deep copy of plain data
    output = data.setdefault("output", {})
    old_name, root = output.get("name") or run_dir.name, output.get("runs_root", "runs")
    output["name"] = None
    header = [
        f"# The recipe that reproduces the run {json.dumps(old_name)} (trained by vision_peft {version or '?'}): its",
        "# resolved config after the command-line overrides, every key spelled out. Train it again with",
        "#   python -m vision_peft train recipe.yaml [--section.key=value ...]",
        "# output.name is null on purpose: that makes a new run directory",
        f"# {json.dumps(root)}/<task>-<adapter>-<timestamp> and never touches the original (named {json.dumps(old_name)}",
        "# under that runs_root); pass --output.name=... / --output.runs_root=... to choose. Relative paths are kept",
        "# as given and resolve as in any recipe: data paths (task.data_root ...) against the working directory, then",
        "# $VISION_PEFT_DATA; backbone.weights against the working directory.",
    ]
    text = "\n".join(header) + "\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    path = run_dir / RECIPE_FILE
    atomic_write_text(path, text)
    return path


def is_finished(run_dir: str | Path) -> bool:
    """A run that can be loaded for prediction: config.json and adapter.safetensors are both there."""
    d = Path(run_dir)
    return d.is_dir() and (d / CONFIG_FILE).is_file() and (d / ADAPTER_FILE).is_file()


# -- metrics.jsonl ------------------------------------------------------------------------------------------
def append_metrics(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Append one record (a training step, or an evaluation with a ``"split"`` key) to ``metrics.jsonl``.

    Raises:
        WriteError: the disk is full or a size limit was hit (a partial line may remain: readers skip it and a
            resume rewrites the file).
    """
    path = Path(run_dir) / METRICS_FILE
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise write_error(path, e) from e


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of ``metrics.jsonl`` in order; a line still being written (not yet JSON) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for ln in path.read_text().splitlines():
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError:
            continue
    return out


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop records written after ``step`` (a resume from that checkpoint writes them again)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    keep = []
    for ln in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:  # a line cut short by a crash or a full disk
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            keep.append(ln)
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


# -- model card ---------------------------------------------------------------------------------------------
def describe_counts(c: dict[str, int]) -> str:
    """``trainable 294,912 / 86,567,656 (0.34 %) with head; … of the backbone without head`` (log and card)."""
    return (
        f"trainable {c['trainable']:,} / {c['total']:,} ({100 * c['trainable'] / c['total']:.2f} %) with head; "
        f"{c['trainable_no_head']:,} / {c['backbone_total']:,} "
        f"({100 * c['trainable_no_head'] / max(1, c['backbone_total']):.2f} %) of the backbone without head"
    )


def write_model_card(run_dir: str | Path, info: RunInfo, final: dict[str, Any]) -> Path:
    """Write ``README.md``: what was trained, on what, and the final metrics; returns its path."""
    run_dir = Path(run_dir)
    cfg = info.config
    lines = [
        f"# {run_dir.name}",
        "",
        f"- task: `{info.task_name}`; backbone: `{cfg['backbone']['name']}` ({info.backbone.weights_source}); "
        f"adapter: `{info.adapter_name}`",
        f"- {describe_counts(info.parameters)}",
        f"- steps: {final.get('step')}, device: {info.device}, amp: {info.amp}, vision_peft {info.vision_peft_version}",
        "",
        "| split | metric | value |",
        "|---|---|---|",
    ]
    for split in ("val", "test"):
        for k, v in (final.get(split) or {}).items():
            if isinstance(v, (int, float)):
                lines.append(f"| {split} | {k} | {v:.4f} |" if isinstance(v, float) else f"| {split} | {k} | {v} |")
    lines += ["", f"Reproduce: `python -m vision_peft train {run_dir / CONFIG_FILE}`", ""]
    path = run_dir / CARD_FILE
    atomic_write_text(path, "\n".join(lines))
    return path
