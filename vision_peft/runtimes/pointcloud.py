"""Point-cloud classification runtime: point files (PCD, OFF, PLY, NPY/NPZ, HDF5) or arrays -> class probabilities,
preprocessed exactly as in training (up axis, sampling, unit sphere; :mod:`vision_peft.pointio`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vision_peft import pointio
from vision_peft.runtimes import RUNTIMES
from vision_peft.runtimes.base import (
    CliArg,
    HttpField,
    HttpRequest,
    LoadTestOptions,
    LoadTestRequests,
    Runtime,
    check_list,
    checked_top_k,
    logits_graph,
    ranked_rows,
    read_upload_files,
    record_of,
)
from vision_peft.runtimes.classification import UploadRequests


@RUNTIMES.register("pointcloud", help="point files -> class probabilities")
class PointCloudRuntime(Runtime):
    """Point-cloud classifier bundles: one graph points -> ``logits``; a ``points`` preprocess spec."""

    task = "pointcloud"
    endpoint = "/v1/points"
    panel = "ranked_points"
    methods = ("classify_points",)
    needs_labels = True
    cli_inputs = "point files"
    cli_args = (CliArg(("--top-k",), {"type": int, "default": 5, "help": "classes listed per input (default: 5)"}),)
    http_fields = (HttpField("files", "files"), HttpField("top_k", "query", type=int))
    load_test_inputs = f"point files ({', '.join(pointio.POINT_EXTS)})"

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

    def predict_cli(self, inputs: Sequence[str], args: argparse.Namespace) -> list[dict[str, Any]]:
        res = self.classify_points(list(inputs), args.batch_size)
        return [record_of(i, r, args.top_k) for i, r in zip(inputs, res, strict=True)]

    def http(self, request: HttpRequest) -> dict[str, Any]:
        top_k = checked_top_k(request.value("top_k"), len(self.bundle.labels))
        names, paths = request.files_on_disk("files", pointio.POINT_EXTS)
        res = self.classify_points(paths)
        return {"results": [record_of(n, r, top_k) for n, r in zip(names, res, strict=True)]}

    @classmethod
    def load_test_request(cls, inputs: Path | None, options: LoadTestOptions) -> LoadTestRequests:
        return UploadRequests(cls.endpoint, read_upload_files(inputs or Path("."), pointio.POINT_EXTS), ".off")
