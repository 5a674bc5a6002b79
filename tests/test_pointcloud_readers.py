"""Point clouds: readers (every format, every bad input) and preprocessing (unit sphere, up axis, sampling,
seeded augmentation, few-shot subsets). Backbones and prompts are in test_pointcloud_models.py, the CLI end to
end in test_pointcloud_cli.py."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from vision_peft.data.points import (
    PointAugment,
    PointCloudDataset,
    PointFileError,
    PointSample,
    convert_up_axis,
    farthest_point_sample,
    few_shot_subset,
    normalize_unit_sphere,
    preprocess_points,
    read_points,
    sample_points,
    scan_point_folder,
)

RNG = np.random.default_rng(0)
PTS = RNG.normal(size=(40, 3)).astype(np.float32)


# -- writers for generated files --------------------------------------------------------------------------------
def write_pcd(path: Path, pts: np.ndarray, binary: bool, fields: str = "x y z") -> Path:
    n, c = pts.shape
    head = (
        f"# .PCD v0.7\nVERSION 0.7\nFIELDS {fields}\nSIZE {' '.join(['4'] * c)}\nTYPE {' '.join(['F'] * c)}\n"
        f"COUNT {' '.join(['1'] * c)}\nWIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\n"
        f"DATA {'binary' if binary else 'ascii'}\n"
    )
    body = (
        pts.astype("<f4").tobytes() if binary else "".join(" ".join(f"{v:.7g}" for v in r) + "\n" for r in pts).encode()
    )
    path.write_bytes(head.encode() + body)
    return path


def write_ply(path: Path, pts: np.ndarray, fmt: str, extra: bool = False) -> Path:
    props = ["x", "y", "z"] + (["red", "green", "blue"] if extra else [])
    head = f"ply\nformat {fmt} 1.0\nelement vertex {len(pts)}\n"
    head += "".join(f"property float {p}\n" if p in "xyz" else f"property uchar {p}\n" for p in props)
    head += "element face 0\nproperty list uchar int vertex_indices\nend_header\n"
    if fmt == "ascii":
        rows = [" ".join(f"{v:.7g}" for v in r) + (" 10 20 30" if extra else "") for r in pts]
        path.write_bytes(head.encode() + ("\n".join(rows) + "\n").encode())
    else:
        rec = b"".join(struct.pack("<fff", *r) + (b"\x0a\x14\x1e" if extra else b"") for r in pts)
        path.write_bytes(head.encode() + rec)
    return path


def write_off(path: Path, pts: np.ndarray) -> Path:
    faces = [(0, 1, 2), (1, 2, 3)]
    text = f"OFF\n{len(pts)} {len(faces)} 0\n" + "".join(" ".join(f"{v:.7g}" for v in r) + "\n" for r in pts)
    text += "".join(f"3 {a} {b} {c}\n" for a, b, c in faces)
    path.write_text(text)
    return path


def write_h5(path: Path, data: np.ndarray, label: np.ndarray | None) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        f["data"] = data
        if label is not None:
            f["label"] = label.reshape(-1, 1)
    return path


@pytest.fixture
def every_format(tmp_path: Path) -> dict[str, Path]:
    np.savez(tmp_path / "p.npz", points=PTS)
    np.save(tmp_path / "p.npy", PTS)
    return {
        "pcd_ascii": write_pcd(tmp_path / "a.pcd", PTS, binary=False),
        "pcd_binary": write_pcd(tmp_path / "b.pcd", PTS, binary=True),
        "off": write_off(tmp_path / "m.off", PTS),
        "ply_ascii": write_ply(tmp_path / "a.ply", PTS, "ascii"),
        "ply_binary": write_ply(tmp_path / "b.ply", PTS, "binary_little_endian"),
        "npy": tmp_path / "p.npy",
        "npz": tmp_path / "p.npz",
        "h5": write_h5(tmp_path / "p.h5", np.stack([PTS * 2, PTS]), np.array([3, 1])),
    }


# -- readers ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["pcd_ascii", "pcd_binary", "off", "ply_ascii", "ply_binary", "npy", "npz", "h5"])
def test_every_format_reads_the_same_points(fmt: str, every_format: dict[str, Path]) -> None:
    got = read_points(every_format[fmt], index=1)
    assert got.dtype == np.float32 and got.shape == (40, 3)
    np.testing.assert_allclose(got, PTS, rtol=1e-5, atol=1e-6)


def test_off_surface_sampling(every_format: dict[str, Path]) -> None:
    pts = read_points(every_format["off"], off_points=500)
    assert pts.shape == (500, 3) and np.isfinite(pts).all()


def test_h5_folder_layout(tmp_path: Path) -> None:
    write_h5(tmp_path / "ply_data_train0.h5", np.stack([PTS] * 4), np.array([0, 1, 2, 1]))
    write_h5(tmp_path / "ply_data_test0.h5", np.stack([PTS] * 2), np.array([2, 0]))
    (tmp_path / "shape_names.txt").write_text("cup\nbowl\nvase\n")
    scan = scan_point_folder(tmp_path)
    assert scan.classes == ["cup", "bowl", "vase"] and len(scan.splits["train"]) == 4
    sub = scan_point_folder(tmp_path, ["vase", "cup"])
    assert [s.label for s in sub.splits["test"]] == [0, 1]
    ds = PointCloudDataset(sub.splits["test"], 32, "random", "none")
    assert ds[0]["points"].shape == (32, 3)


@pytest.mark.parametrize("ext", [".pcd", ".off", ".ply", ".npy", ".npz", ".h5", ".xyz"])
def test_empty_file_is_named(tmp_path: Path, ext: str) -> None:
    f = tmp_path / f"empty{ext}"
    f.write_bytes(b"")
    with pytest.raises(PointFileError, match="empty|unknown point-cloud extension") as e:
        read_points(f)
    assert str(f) in str(e.value)


def test_nan_and_inf_are_refused_with_the_row(tmp_path: Path) -> None:
    bad = PTS.copy()
    bad[7, 1] = np.nan
    bad[9, 0] = np.inf
    for f in (write_pcd(tmp_path / "n.pcd", bad, binary=True), write_ply(tmp_path / "n.ply", bad, "ascii")):
        with pytest.raises(PointFileError, match=r"2 point\(s\) with NaN/inf coordinates \(first at row 7\)") as e:
            read_points(f)
        assert str(f) in str(e.value) and "remove those points" in str(e.value)


def test_extra_columns_take_xyz_or_error(tmp_path: Path, caplog) -> None:
    rgb = np.concatenate([PTS, RNG.random((40, 3)).astype(np.float32)], axis=1)
    files = [
        write_pcd(tmp_path / "c.pcd", rgb, binary=True, fields="x y z r g b"),
        write_ply(tmp_path / "c.ply", PTS, "binary_little_endian", extra=True),
        tmp_path / "c.npy",
    ]
    np.save(files[2], rgb)
    for f in files:
        with caplog.at_level(logging.WARNING, logger="vision_peft"):
            caplog.clear()
            np.testing.assert_allclose(read_points(f), PTS, rtol=1e-5)
        assert "x, y, z" in caplog.text or "first three" in caplog.text
        with pytest.raises(PointFileError, match="extra_columns=take_xyz") as e:
            read_points(f, extra_columns="error")
        assert str(f) in str(e.value)
    np.save(tmp_path / "two.npy", PTS[:, :2])
    with pytest.raises(PointFileError, match="2 column"):
        read_points(tmp_path / "two.npy")


def test_unknown_extension_and_unsupported_pcd(tmp_path: Path) -> None:
    (tmp_path / "p.xyz").write_text("0 0 0\n")
    with pytest.raises(PointFileError, match=r"unknown point-cloud extension '.xyz'; supported: .pcd"):
        read_points(tmp_path / "p.xyz")
    f = write_pcd(tmp_path / "c.pcd", PTS, binary=True)
    f.write_bytes(f.read_bytes().replace(b"DATA binary", b"DATA binary_compressed"))
    with pytest.raises(PointFileError, match="binary_compressed.*not supported"):
        read_points(f)
    write_h5(tmp_path / "nolab.h5", PTS[None], None)
    with pytest.raises(PointFileError, match="out of range"):
        read_points(tmp_path / "nolab.h5", index=3)


def test_too_few_points_resample_with_replacement_and_say_so(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="vision_peft"):
        out = sample_points(PTS[:10], 64, "random", np.random.default_rng(0), name="tiny.pcd")
    assert out.shape == (64, 3) and "tiny.pcd has 10 points, fewer than the 64 required" in caplog.text
    assert "with replacement" in caplog.text
    assert {tuple(r) for r in out} == {tuple(r) for r in PTS[:10]}  # every original point kept, duplicates added


# -- preprocessing ------------------------------------------------------------------------------------------------
def test_normalise_up_axis_and_sampling() -> None:
    p = normalize_unit_sphere(PTS * 7 + 3)
    np.testing.assert_allclose(p.mean(0), 0, atol=1e-5)
    assert np.linalg.norm(p, axis=1).max() == pytest.approx(1.0, abs=1e-6)
    z_up = np.array([[0.0, 0.0, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(convert_up_axis(z_up, "swap_yz"), [[0.0, 1.0, 0.0]])
    np.testing.assert_array_equal(convert_up_axis(z_up, "none"), z_up)
    with pytest.raises(ValueError, match="unknown up-axis rule"):
        convert_up_axis(z_up, "x_up")
    line = np.linspace(0, 1, 101, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    idx = farthest_point_sample(line, 3, start=0)
    assert sorted(idx.tolist()) == [0, 50, 100]  # the ends and the middle
    fps = sample_points(line, 3, "fps", np.random.default_rng(0))
    assert fps.shape == (3, 3)
    out = preprocess_points(PTS, 16, "random", "swap_yz", np.random.default_rng(0))
    assert out.shape == (16, 3) and np.linalg.norm(out, axis=1).max() == pytest.approx(1.0, abs=1e-6)


def test_augmentation_is_seeded_per_sample_and_epoch(tmp_path: Path) -> None:
    aug = PointAugment(scale=(0.8, 1.25), jitter=0.01, rotate=180.0, dropout=0.5)
    a = aug(PTS, np.random.default_rng(3))
    np.testing.assert_array_equal(a, aug(PTS, np.random.default_rng(3)))
    assert not np.allclose(a, PTS)
    rot = PointAugment(scale=(1.0, 1.0), jitter=0.0, rotate=90.0)(PTS, np.random.default_rng(0))
    np.testing.assert_allclose(rot[:, 1], PTS[:, 1], atol=1e-6)  # rotation about y keeps the up coordinate
    np.testing.assert_allclose(
        np.linalg.norm(rot[:, [0, 2]], axis=1), np.linalg.norm(PTS[:, [0, 2]], axis=1), rtol=1e-5
    )
    np.save(tmp_path / "s.npy", PTS)
    samples = [PointSample(str(tmp_path / "s.npy"), 0)] * 2
    ds = PointCloudDataset(samples, 32, "random", "none", augment=aug, seed=5)
    x0 = ds[0]["points"]
    assert torch.equal(x0, ds[0]["points"]) and not torch.equal(x0, ds[1]["points"])
    ds.set_epoch(1)
    assert not torch.equal(x0, ds[0]["points"])
    ds.set_epoch(0)
    assert torch.equal(x0, ds[0]["points"])  # a resumed epoch draws the same augmentation


def test_few_shot_subset_is_seeded_and_stratified() -> None:
    samples = [PointSample(str(i), i % 3) for i in range(30)]
    a = few_shot_subset(samples, 2, None, 0, 3)
    assert [s.label for s in a] == [0, 0, 1, 1, 2, 2] and a == few_shot_subset(samples, 2, None, 0, 3)
    assert a != few_shot_subset(samples, 2, None, 1, 3)
    assert len(few_shot_subset(samples, None, 0.5, 0, 3)) == 15
    with pytest.raises(PointFileError, match="11 shots requested"):
        few_shot_subset(samples, 11, None, 0, 3)
