"""Adapter packs vs merged bundles on real AID runs: bytes on disk, latency, switching cost, per-adapter parity,
the load test over a pack's adapters and the server's memory — the acceptance numbers of issue 15, in one run.

Trains short real runs of ``tasks/classification-aid.yaml`` (EfficientNet-Lite0 128² + LoRA r=8 on the pointwise
convs) in ``--runs-root`` (kept: a second call reuses finished runs): ``--runs`` runs (default 20), run ``i`` on a
seeded random subset of 5–10 AID classes with train seed ``i``, ``--steps`` optimizer steps of batch 16 on the
recipe's fixed split (60/10/30 per class, split seed 0), so every run has its own labels, head size and test
split. ``--small-runs`` more runs of each smaller-footprint layout give the bytes of those layouts too: LoRA r=2
on the same convs, a linear probe (head only) and deep VPT on a ViT-Tiny (random init: no ViT weights are
offline, so its runs say nothing about accuracy; the bytes depend only on the layout). Then:

(a) bytes: one pack (``vision_peft.pack.export_pack``) of the first N runs vs the N runs' merged bundles
    (``vision_peft.export.export_run``), N = 1, 5, 20 (every file of each folder counted);
(b) latency of the image → logits graph through the 5-adapter pack (unmerged LoRA, the adapter activated per call
    with ``RunOptions.add_active_adapter``) vs run 0's merged bundle, batch 1 and 8, both sessions with the same
    ``--threads`` intra-op threads, conditions interleaved round by round so machine noise hits them alike; the
    switching cost = the same adapter on every call vs a different adapter on each consecutive call;
(c) parity per adapter: the 20-adapter pack vs that run's merged bundle on the run's AID test split (max |Δ| of
    the logits, top-1 agreement, test top-1 of both);
(d) ``bench/load_test.py --adapters all`` against server processes of the 5- and 20-adapter packs and of one
    merged bundle (concurrency 1/4/16, every 10th request malformed), and the resident memory (VmRSS) of: the
    pack servers and 5 merged-bundle servers started side by side (each warmed with the same requests).

    nice -n 10 python bench/adapter_packs.py --threads 1 --runs-root /tmp/vp-packs \
        > /work/coord/logs/adapter_packs.log 2>&1

Writes ``--out`` (JSON) and the same tables as markdown beside it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "tasks" / "classification-aid.yaml"
TINY_VIT = {"name": "timm:vit_tiny_patch16_224", "pretrained": False, "image_size": 128}
LAYOUTS = {  # name -> (adapter section or None for the recipe's, backbone section or None, fixed seed, description)
    "lora_r8": (None, None, None, "EfficientNet-Lite0: LoRA r=8, alpha 16 on every pointwise conv (the recipe)"),
    "lora_r2": ({"name": "lora", "r": 2, "alpha": 4, "targets": ["conv_pw"]}, None, None,
                "EfficientNet-Lite0: LoRA r=2, alpha 4, same convs"),
    "linear": ({"name": "linear"}, None, None, "EfficientNet-Lite0: linear probe (head only, backbone frozen)"),
    "vpt_vit_tiny": ({"name": "vpt", "num_tokens": 10, "deep": True}, TINY_VIT, 0,
                     "ViT-Tiny/16 at 128², RANDOM INIT (no ViT weights offline; bytes only, accuracy meaningless): "
                     "deep VPT, 10 tokens per block; train seed 0 for every run so the random backbone (its "
                     "weight hash) is shared"),
}  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def aid_root() -> Path:
    from vision_peft.paths import data_root

    return Path(data_root()) / "aid"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_classes(i: int, all_classes: list[str]) -> list[str]:
    k = 5 + i % 6
    return sorted(random.Random(1000 + i).sample(all_classes, k))


def train_runs(root: Path, layout: str, n: int, steps: int, all_classes: list[str]) -> list[dict]:
    """Trains (or reuses) ``n`` runs of ``layout``; returns their records."""
    import yaml

    from vision_peft.recipe import apply_overrides, build_run_config
    from vision_peft.train import run

    out = []
    for i in range(n):
        name = f"{layout}-{i:02d}"
        run_dir = root / "runs" / name
        classes = run_classes(i, all_classes)
        t = time.perf_counter()
        if not (run_dir / "final_metrics.json").is_file():
            if run_dir.exists():
                shutil.rmtree(run_dir)
            data = yaml.safe_load(RECIPE.read_text())
            section, backbone, seed, _ = LAYOUTS[layout]
            if section is not None:
                data["adapter"] = dict(section)
            if backbone is not None:
                data["backbone"] = dict(backbone)
            data = apply_overrides(data, {
                "task": {"classes": classes},
                "train": {"max_steps": steps, "batch_size": 16, "seed": i if seed is None else seed, "device": "cpu",
                          "amp": "none"},
                "output": {"runs_root": str(root / "runs"), "name": name},
            })  # fmt: skip
            run_dir = Path(run(build_run_config(data), progress=False))
            from tests.conftest import reset_vision_peft_logging

            reset_vision_peft_logging()
        final = json.loads((run_dir / "final_metrics.json").read_text())
        seed = LAYOUTS[layout][2]
        rec = {"name": name, "dir": str(run_dir), "classes": len(classes), "seed": i if seed is None else seed,
               "test_top1": final.get("test", {}).get("top1"), "train_s": round(time.perf_counter() - t, 1)}  # fmt: skip
        log(f"run {name}: {len(classes)} classes, test top-1 {rec['test_top1']}, {rec['train_s']} s")
        out.append(rec)
    return out


def export_all(root: Path, layout: str, runs: list[dict], pack_sizes: list[int]) -> dict:
    """Merged bundle per run, one pack per N; returns the bytes table of the layout."""
    from vision_peft.export import export_run
    from vision_peft.pack import export_pack

    merged = []
    for r in runs:
        out = root / "merged" / r["name"]
        t = time.perf_counter()
        if not (out / "manifest.json").is_file():
            export_run(r["dir"], out)
        merged.append(folder_bytes(out))
        log(f"merged bundle {r['name']}: {merged[-1]:,} B ({time.perf_counter() - t:.1f} s)")
    rows = []
    for n in pack_sizes:
        if n > len(runs):
            continue
        out = root / "packs" / f"{layout}-n{n}"
        t = time.perf_counter()
        if not (out / "manifest.json").is_file():
            export_pack([r["dir"] for r in runs[:n]], out, names=[r["name"] for r in runs[:n]])
        secs = time.perf_counter() - t
        man = json.loads((out / "manifest.json").read_text())
        graph_files = [g["file"] for g in man["graphs"].values()]
        graph_bytes = sum(folder_bytes_file(out, f) for f in graph_files)
        adapter_bytes = [(out / f"{r['name']}.onnx_adapter").stat().st_size for r in runs[:n]]
        meta_bytes = [(out / f"{r['name']}.adapter.json").stat().st_size for r in runs[:n]]
        pack = folder_bytes(out)
        graph0 = next(iter(man["graphs"].values()))
        zero_defaults = sum(
            int(np.prod([d if isinstance(d, int) else 1 for d in spec["shape"]])) * np.dtype(spec["dtype"]).itemsize
            for g in man["graphs"].values() for spec in (g.get("adapter_inputs") or {}).values()
        )  # fmt: skip
        merged0 = root / "merged" / runs[0]["name"]
        merged_graph = folder_bytes_file(merged0, json.loads((merged0 / "manifest.json").read_text())["graphs"]
                                         ["model"]["file"])  # fmt: skip
        rows.append({
            "base_graph_proto_bytes": (out / graph0["file"]).stat().st_size,
            "zero_default_initializer_bytes": zero_defaults, "merged_graph_bytes": merged_graph,
            "manifest_bytes": (out / "manifest.json").stat().st_size,
            "n": n, "pack_bytes": pack, "merged_bytes": sum(merged[:n]), "one_merged_bytes": merged[0],
            "pack_over_one_merged": pack / merged[0], "pack_over_n_merged": pack / sum(merged[:n]),
            "base_graph_bytes": graph_bytes, "adapter_file_bytes_mean": float(np.mean(adapter_bytes)),
            "adapter_json_bytes_mean": float(np.mean(meta_bytes)), "export_s": round(secs, 1),
        })  # fmt: skip
        log(f"pack {layout} N={n}: {pack:,} B vs {sum(merged[:n]):,} B merged ({pack / merged[0]:.3f}× one merged)")
    return {"layout": LAYOUTS[layout][3], "merged_bytes": merged, "rows": rows}


def folder_bytes_file(folder: Path, name: str) -> int:
    """A graph file plus its external-data file."""
    return sum((folder / f).stat().st_size for f in (name, f"{name}.data") if (folder / f).is_file())


def session_options(threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def preprocessed(bundle, paths: list[str]) -> np.ndarray:
    from vision_peft.preprocess import preprocess_batch
    from vision_peft.runtimes.base import image_spec, logits_graph

    _, name, _ = logits_graph(bundle)
    return preprocess_batch(paths, image_spec(bundle, name))


def latency(
    pack_dir: Path, big_dir: Path, merged_dir: Path, names: list[str], images: list[str], threads: int, rounds: int
) -> dict:
    """Graph latency (ms) per call: merged vs pack (same adapter) vs pack (switching adapter on every call, over
    the pack's adapters; and over the bigger pack's), batch 1 and 8."""
    from vision_peft.deploy import load_bundle

    pack = load_bundle(pack_dir, device="cpu", session_options=session_options(threads))
    big = load_bundle(big_dir, device="cpu", session_options=session_options(threads))
    merged = load_bundle(merged_dir, device="cpu", session_options=session_options(threads))
    views = [pack.select(n) for n in names]
    big_views = [big.select(n) for n in big.adapters]
    x_all = preprocessed(views[0], images[:8])
    out: dict = {"threads": threads, "rounds": rounds, "adapters": len(views), "adapters_big": len(big_views)}
    for batch in (1, 8):
        x = x_all[:batch]
        conds = {
            "merged": lambda i, x=x: merged.run("model", image=x),
            "pack_same_adapter": lambda i, x=x: views[0].run("model", image=x),
            "pack_switching": lambda i, x=x: views[i % len(views)].run("model", image=x),
            "pack_select_per_call": lambda i, x=x: pack.select(names[i % len(names)]).run("model", image=x),
            "big_pack_same_adapter": lambda i, x=x: big_views[0].run("model", image=x),
            "big_pack_switching": lambda i, x=x: big_views[i % len(big_views)].run("model", image=x),
        }
        times = {k: [] for k in conds}
        for f in conds.values():  # warm-up
            for i in range(5):
                f(i)
        order = list(conds)
        rng = random.Random(batch)
        for i in range(rounds if batch == 1 else max(20, rounds // 4)):
            rng.shuffle(order)
            for k in order:
                t = time.perf_counter()
                conds[k](i)
                times[k].append((time.perf_counter() - t) * 1000)
        res = {k: {"median_ms": statistics.median(v), "p90_ms": float(np.percentile(v, 90)), "n": len(v)}
               for k, v in times.items()}  # fmt: skip
        res["pack_over_merged_median"] = res["pack_same_adapter"]["median_ms"] / res["merged"]["median_ms"]
        res["switch_cost_median_ms"] = res["pack_switching"]["median_ms"] - res["pack_same_adapter"]["median_ms"]
        res["big_switch_cost_median_ms"] = (
            res["big_pack_switching"]["median_ms"] - res["big_pack_same_adapter"]["median_ms"]
        )
        out[f"batch{batch}"] = res
        log(f"latency batch {batch}: " + ", ".join(f"{k} {v['median_ms']:.2f}/{v['p90_ms']:.2f} ms"
                                                   for k, v in res.items() if isinstance(v, dict)))  # fmt: skip
    return out


def parity(pack_dir: Path, root: Path, runs: list[dict], threads: int) -> list[dict]:
    """Each adapter through the pack vs its run's merged bundle, on the run's AID test split."""
    from vision_peft.deploy import load_bundle

    pack = load_bundle(pack_dir, device="cpu", session_options=session_options(threads))
    rows = []
    for r in runs:
        merged = load_bundle(root / "merged" / r["name"], device="cpu", session_options=session_options(threads))
        view = pack.select(r["name"])
        split = json.loads((Path(r["dir"]) / "split.json").read_text())
        test = [str(p) for p in split["test"]]
        labels = [merged.labels.index(Path(p).parent.name) for p in test]
        diffs, agree, hit_p, hit_m = [], 0, 0, 0
        for s in range(0, len(test), 32):
            x = preprocessed(merged, test[s : s + 32])
            lp = view.run("model", image=x)["logits"]
            lm = merged.run("model", image=x)["logits"]
            diffs.append(float(np.abs(lp - lm).max()))
            agree += int((lp.argmax(1) == lm.argmax(1)).sum())
            y = np.asarray(labels[s : s + 32])
            hit_p += int((lp.argmax(1) == y).sum())
            hit_m += int((lm.argmax(1) == y).sum())
        rows.append({"adapter": r["name"], "classes": r["classes"], "n_test": len(test),
                     "max_abs_logit_diff": max(diffs), "top1_agreement": agree / len(test),
                     "test_top1_pack": hit_p / len(test), "test_top1_merged": hit_m / len(test),
                     "run_test_top1": r["test_top1"]})  # fmt: skip
        log(f"parity {r['name']}: max|Δ| {max(diffs):.2e}, agreement {agree / len(test):.4f} on {len(test)} images")
    return rows


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_test(bundle: Path, inputs: Path, threads: int, requests: int, adapters: bool, out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "load_test.py"), str(bundle), "--inputs", str(inputs),
           "--levels", "1", "4", "16", "--requests", str(requests), "--bad-every", "10", "--threads", str(threads),
           "--seconds", "120", "--json-out", str(out)] + (["--adapters", "all"] if adapters else [])  # fmt: skip
    res = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    print(res.stdout[-3000:], flush=True)
    if res.returncode != 0:
        print(res.stderr[-3000:], flush=True)
        return {"error": f"load_test exited {res.returncode}", "stdout": res.stdout[-2000:]}
    return json.loads(out.read_text())


def start_server(bundle: Path, threads: int):
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vision_peft", "serve", str(bundle), "--port", str(port), "--device", "cpu"],
        env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads)),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server for {bundle} did not start: {proc.stderr.read().decode()[-2000:]}")


def warm_and_rss(base: str, proc, images: list[Path], adapters: list[str] | None, per_adapter: int) -> dict:
    import httpx

    from bench.load_test import server_memory

    for name in adapters or [None]:
        for i in range(per_adapter):
            p = images[i % len(images)]
            params = {"adapter": name} if name else {}
            r = httpx.post(f"{base}/v1/classify", files=[("files", (p.name, p.read_bytes(), "image/jpeg"))],
                           params=params, timeout=60)  # fmt: skip
            if r.status_code != 200:
                raise RuntimeError(f"warm-up request failed: {r.status_code} {r.text[:300]}")
    return server_memory(proc.pid)


def memory(root: Path, runs: list[dict], pack_sizes: list[int], images: list[Path], threads: int) -> dict:
    """VmRSS of pack servers (N adapters) and of 5 merged-bundle servers side by side, each warmed with the same
    number of requests per adapter."""
    out: dict = {"packs": {}, "merged": []}
    for n in pack_sizes:
        pack = root / "packs" / f"lora_r8-n{n}"
        if not pack.is_dir():
            continue
        proc, base = start_server(pack, threads)
        try:
            out["packs"][n] = warm_and_rss(base, proc, images, [r["name"] for r in runs[:n]], 4)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        log(f"pack server N={n}: RSS {out['packs'][n].get('VmRSS', 0) / 2**20:.1f} MiB")
    procs = []
    try:
        for r in runs[:5]:
            procs.append(start_server(root / "merged" / r["name"], threads))
        for proc, base in procs:
            out["merged"].append(warm_and_rss(base, proc, images, None, 4))
    finally:
        for proc, _ in procs:
            proc.terminate()
            proc.wait(timeout=30)
    total = sum(m.get("VmRSS", 0) for m in out["merged"])
    out["merged_5_servers_rss_sum"] = total
    log(f"5 merged servers: RSS sum {total / 2**20:.1f} MiB ({[round(m['VmRSS'] / 2**20, 1) for m in out['merged']]})")
    return out


def markdown(res: dict) -> str:
    mib = 2**20
    lines = ["# Adapter packs vs merged bundles (AID, EfficientNet-Lite0 128²)", "",
             f"Command: `{res['command']}`; {res['machine']}; {res['setup']['threads']} thread(s).", ""]  # fmt: skip
    lines += ["## Bytes on disk", "", *[f"- {k}: {v['layout']}" for k, v in res["bytes"].items()], "", "| layout | N | one pack (MB) | N merged bundles (MB) | pack / one merged | "
              "pack / N merged | base graph (MB) | per adapter file + json (KB) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, b in res["bytes"].items():
        for r in b["rows"]:
            lines.append(
                f"| {name} | {r['n']} | {r['pack_bytes'] / 1e6:.2f} | {r['merged_bytes'] / 1e6:.2f} | "
                f"{r['pack_over_one_merged']:.3f} | {r['pack_over_n_merged']:.3f} | {r['base_graph_bytes'] / 1e6:.2f} | "
                f"{(r['adapter_file_bytes_mean'] + r['adapter_json_bytes_mean']) / 1e3:.1f} |"
            )
    lat = res.get("latency")
    if lat:
        lines += ["", f"## Latency of the image → logits graph ({lat['threads']} intra-op thread(s), ms)", "",
                  f"median / p90 over {lat['rounds']} calls per condition at batch 1 ({max(20, lat['rounds'] // 4)} at "
                  "8), conditions interleaved in random order each round", "",
                  f"| batch | merged | pack ({lat['adapters']}), same adapter | pack ({lat['adapters']}), switching "
                  f"adapter each call | pack ({lat['adapters']}), select() per call | pack ({lat['adapters_big']}), "
                  f"same adapter | pack ({lat['adapters_big']}), switching | pack / merged (median) | "
                  f"switch cost ({lat['adapters']} / {lat['adapters_big']} adapters, median) |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for b in (1, 8):
            r = lat[f"batch{b}"]
            cell = lambda k, r=r: f"{r[k]['median_ms']:.2f} / {r[k]['p90_ms']:.2f}"  # noqa: E731
            lines.append(f"| {b} | {cell('merged')} | {cell('pack_same_adapter')} | {cell('pack_switching')} | "
                         f"{cell('pack_select_per_call')} | {cell('big_pack_same_adapter')} | "
                         f"{cell('big_pack_switching')} | {r['pack_over_merged_median']:.3f} | "
                         f"{r['switch_cost_median_ms']:+.3f} / {r['big_switch_cost_median_ms']:+.3f} ms |")  # fmt: skip
    par = res.get("parity")
    if par:
        lines += ["", "## Parity per adapter: pack vs that run's merged bundle, on the run's AID test split", "",
                  "| adapter | classes | test images | max abs logit diff | top-1 agreement | test top-1 pack | "
                  "test top-1 merged |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in par:
            lines.append(f"| {r['adapter']} | {r['classes']} | {r['n_test']} | {r['max_abs_logit_diff']:.2e} | "
                         f"{r['top1_agreement']:.4f} | {r['test_top1_pack']:.4f} | {r['test_top1_merged']:.4f} |")  # fmt: skip
    lt = res.get("load_test")
    if lt:
        lines += ["", "## Load test (server process, every 10th request malformed)", "",
                  "| server | concurrency | ok | malformed (4xx) | 5xx | req/s | p50 ms | p99 ms | RSS after (MiB) |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, r in lt.items():
            if "levels" not in r:
                lines.append(f"| {name} | error: {r.get('error')} | | | | | | | |")
                continue
            for row in r["levels"]:
                codes = {int(k): v for k, v in row["codes"].items()}
                lines.append(
                    f"| {name} | {row['concurrency']} | {row['ok']} | "
                    f"{sum(v for k, v in codes.items() if 400 <= k < 500)} | "
                    f"{sum(v for k, v in codes.items() if k >= 500)} | {row['throughput_rps']:.1f} | "
                    f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {r['server_memory'].get('VmRSS', 0) / mib:.1f} |"
                )
    mem = res.get("memory")
    if mem:
        lines += ["", "## Server memory (VmRSS after warm-up: 4 requests per adapter)", "",
                  "| server | RSS (MiB) |", "|---|---|"]  # fmt: skip
        for n, m in mem["packs"].items():
            lines.append(f"| one pack server, {n} adapter(s) | {m.get('VmRSS', 0) / mib:.1f} |")
        for i, m in enumerate(mem["merged"]):
            lines.append(f"| merged server {i} | {m.get('VmRSS', 0) / mib:.1f} |")
        lines.append(f"| 5 merged servers, sum (measured) | {mem['merged_5_servers_rss_sum'] / mib:.1f} |")
        one = mem["merged"][0].get("VmRSS", 0) if mem["merged"] else 0
        lines.append(f"| 20 merged servers (one merged server's RSS × 20, estimated) | {one * 20 / mib:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-root", type=Path, default=None, help="where runs, bundles and packs go (default: temp)")
    ap.add_argument("--runs", type=int, default=20, help="LoRA r=8 runs (the largest N)")
    ap.add_argument("--small-runs", type=int, default=5, help="runs of each smaller-footprint layout (0 = none)")
    ap.add_argument("--steps", type=int, default=15, help="optimizer steps per run (batch 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--rounds", type=int, default=200, help="latency: calls per condition at batch 1 (÷4 at 8)")
    ap.add_argument("--requests", type=int, default=200, help="load test: requests per concurrency level")
    ap.add_argument("--skip", nargs="*", default=[], choices=["latency", "parity", "load", "memory"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "adapter_packs.json")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    root = args.runs_root or Path(__import__("tempfile").mkdtemp(prefix="vp-packs-"))
    root.mkdir(parents=True, exist_ok=True)
    all_classes = sorted(p.name for p in aid_root().iterdir() if p.is_dir())
    sizes = sorted({n for n in (1, 5, 20) if n <= args.runs} | {min(5, args.runs), args.runs})
    res: dict = {
        "command": "python bench/adapter_packs.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "git": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "setup": {
            "recipe": str(RECIPE.relative_to(ROOT)),
            "runs": args.runs,
            "small_runs": args.small_runs,
            "steps": args.steps,
            "batch_size": 16,
            "threads": args.threads,
            "runs_root": str(root),
            "classes_per_run": "5 + i mod 6, seeded random subset (random.Random(1000 + i))",
            "train_seed": "i",
        },  # fmt: skip
    }
    runs = {"lora_r8": train_runs(root, "lora_r8", args.runs, args.steps, all_classes)}
    if args.small_runs:
        for layout in ("lora_r2", "linear", "vpt_vit_tiny"):
            runs[layout] = train_runs(root, layout, args.small_runs, args.steps, all_classes)
    res["runs"] = runs
    res["timing_s"] = {"train": round(time.perf_counter() - t0, 1)}
    res["bytes"] = {k: export_all(root, k, v, sizes if k == "lora_r8" else [n for n in (1, 5) if n <= len(v)])
                    for k, v in runs.items()}  # fmt: skip
    res["timing_s"]["export"] = round(time.perf_counter() - t0, 1)
    main_runs = runs["lora_r8"]
    n_mid = min(5, len(main_runs))
    pack_mid, pack_big = root / "packs" / f"lora_r8-n{n_mid}", root / "packs" / f"lora_r8-n{sizes[-1]}"
    test0 = [str(p) for p in json.loads((Path(main_runs[0]["dir"]) / "split.json").read_text())["test"]]
    if "latency" not in args.skip:
        res["latency"] = latency(pack_mid, pack_big, root / "merged" / main_runs[0]["name"],
                                 [r["name"] for r in main_runs[:n_mid]], test0, args.threads, args.rounds)  # fmt: skip
    if "parity" not in args.skip:
        res["parity"] = parity(pack_big, root, main_runs, args.threads)
        res["timing_s"]["parity"] = round(time.perf_counter() - t0, 1)
    inputs = aid_root() / "Beach"
    images = sorted(inputs.glob("*.jpg"))[:16]
    if "load" not in args.skip:
        res["load_test"] = {}
        servers = [(f"pack, {n_mid} adapters", pack_mid, True), (f"pack, {sizes[-1]} adapters", pack_big, True),
                   ("merged bundle (run 0)", root / "merged" / main_runs[0]["name"], False)]  # fmt: skip
        servers = [s for i, s in enumerate(servers) if s[0] not in [t[0] for t in servers[:i]]]
        for rep, order in enumerate((servers, servers[::-1])):  # twice, in opposite orders (machine noise)
            for name, bundle, spread in order:
                key = f"{name}, pass {rep + 1}"
                log(f"load test: {key}")
                res["load_test"][key] = load_test(bundle, inputs, args.threads, args.requests, spread,
                                                  root / f"load-{len(res['load_test'])}.json")  # fmt: skip
        res["timing_s"]["load"] = round(time.perf_counter() - t0, 1)
    if "memory" not in args.skip:
        res["memory"] = memory(root, main_runs, sizes, images, args.threads)
    res["timing_s"]["total"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from vision_peft.rundir import atomic_write_text

    atomic_write_text(args.out, json.dumps(res, indent=2, default=str) + "\n")
    md = markdown(res)
    atomic_write_text(args.out.with_suffix(".md"), md)
    print("\n" + md, flush=True)
    log(f"wrote {args.out} and {args.out.with_suffix('.md')} in {res['timing_s']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
