"""Torch-free per-task runtimes: the numpy half of every task (see :mod:`vision_peft.runtimes.base`).

``RUNTIMES`` maps a runtime name to its :class:`~vision_peft.runtimes.base.Runtime` class; a task's ``runtime``
attribute names its entry. ``deploy``, ``serve``, the deploy CLI and ``bench/load_test.py`` dispatch through it.
Adding a task's runtime = its file plus one import line below.
"""

from vision_peft.registry import Registry

RUNTIMES = Registry("runtime")

from vision_peft.runtimes import (  # noqa: E402,F401  (each registers itself; one line per runtime)
    classification,
    diffusion,
    fewshot,
    multilabel,
    pointcloud,
    refseg,
)
