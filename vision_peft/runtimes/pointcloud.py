"""Point-cloud classification runtime: point files (PCD, OFF, PLY, NPY/NPZ, HDF5) or arrays -> class probabilities,
preprocessed exactly as in training (up axis, sampling, unit sphere; :mod:`vision_peft.pointio`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vision_peft import pointio
from vision_peft.runtimes import RUNTIMES
from vision_peft.runtimes.base import HttpRequest, RankedRuntime, check_list, logits_graph, ranked_rows


@RUNTIMES.register("pointcloud", help="point files -> class probabilities")
class PointCloudRuntime(RankedRuntime):
    """Point-cloud classifier bundles: one graph points -> ``logits``; a ``points`` preprocess spec."""

    task = "pointcloud"
    endpoint = "/v1/points"
    panel = "ranked_points"
    methods = ("classify_points",)
    cli_inputs = "point files"
    load_test_inputs = f"point files ({', '.join(pointio.POINT_EXTS)})"
    load_test_suffixes = pointio.POINT_EXTS
    malformed_suffix = ".off"

    def classify_points(self, clouds: Sequence[str | Path | np.ndarray], batch_size: int = 16) -> list[dict[str, Any]]:
        """Point files (PCD, OFF, PLY, NPY/NPZ, HDF5 ``file.h5``) or (N, 3+) arrays -> class + probabilities,
        preprocessed exactly as in training (up axis, sampling, unit sphere)."""
        check_list(clouds, "classify_points")
        b = self.bundle
        spec = b.preprocess.get("points")
        if not isinstance(spec, dict) or "num_points" not in spec:
            raise ValueError(f"manifest.json of {b.path} has no 'points' preprocess spec; re-export the bundle")
        info = b.task_info
        batch = []
        for i, c in enumerate(clouds):
            if isinstance(c, np.ndarray):
                raw, name = np.asarray(c, dtype=np.float32)[:, :3], f"array {i}"
            else:
                raw = pointio.read_points(
                    c, info.get("extra_columns", "take_xyz"), off_points=info.get("off_points", 0)
                )
                name = str(c)
            batch.append(
                pointio.preprocess_points(
                    raw,
                    int(spec["num_points"]),
                    spec["sampling"]["rule"],
                    spec["up_axis"]["rule"],
                    pointio.eval_rng(0),
                    name,
                )
            )
        graph, _, output = logits_graph(b)
        return ranked_rows(b, graph, output, b.batched_run(graph, np.stack(batch), batch_size, output))

    def uploads(self, request: HttpRequest) -> tuple[list[str], list[Any]]:
        """The uploaded point files, as temporary files with their own suffixes (the readers go by suffix)."""
        return request.files_on_disk("files", pointio.POINT_EXTS)
