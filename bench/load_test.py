"""Load test of ``python -m vision_peft serve`` on loopback: throughput and latency percentiles at concurrency
1, 4 and 16, with malformed requests mixed in mid-load; the server must keep answering.

Traffic goes to 127.0.0.1 only, bounded in count (``--requests`` per level) and time (``--seconds`` per level).

    python bench/load_test.py runs/<run>/export --images ../shared/data/aid/Beach
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def level(
    client: httpx.AsyncClient, url: str, images: list[bytes], conc: int, n: int, seconds: float, bad_every: int
) -> dict:
    lat_ok: list[float] = []
    codes: dict[int, int] = {}
    bad_sent = 0
    counter = iter(range(n))
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal bad_sent
        for i in counter:
            if time.perf_counter() > deadline:
                return
            malformed = bad_every and i % bad_every == bad_every - 1
            if malformed:  # garbage bytes, wrong type, or no file at all
                kind = (i // bad_every) % 3
                files = (
                    [("files", ("bad.jpg", os.urandom(512), "image/jpeg"))]
                    if kind == 0
                    else [("files", ("bad.txt", b"text", "text/plain"))]
                    if kind == 1
                    else None
                )
                bad_sent += 1
            else:
                files = [("files", (f"{i}.jpg", images[i % len(images)], "image/jpeg"))]
            t0 = time.perf_counter()
            r = await client.post(url, files=files) if files else await client.post(url)
            dt = time.perf_counter() - t0
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if not malformed:
                if r.status_code != 200:
                    raise RuntimeError(f"good request failed: {r.status_code} {r.text[:200]}")
                lat_ok.append(dt)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    wall = time.perf_counter() - t0
    lat = np.asarray(lat_ok) * 1000
    return {
        "concurrency": conc,
        "ok": len(lat_ok),
        "malformed": bad_sent,
        "codes": codes,
        "wall_s": wall,
        "throughput_rps": len(lat_ok) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p90_ms": float(np.percentile(lat, 90)),
        "p99_ms": float(np.percentile(lat, 99)),
    }


async def main_async(args) -> int:
    images = [p.read_bytes() for p in sorted(Path(args.images).glob("*.jpg"))[:32]]
    if not images:
        raise SystemExit(f"no .jpg files in {args.images}")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    server = subprocess.Popen(
        [sys.executable, "-m", "vision_peft", "serve", args.bundle, "--port", str(port), "--device", "cpu"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            for _ in range(200):
                try:
                    if (await client.get(f"{base}/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.2)
            else:
                raise SystemExit(f"server did not start: {server.stderr.read().decode()[-2000:]}")
            info = (await client.get(f"{base}/info")).json()
            print(
                f"bundle {args.bundle}: task {info['task']}, providers {info['providers']}, "
                f"{args.requests} requests/level (≤ {args.seconds:.0f} s), 1 image each, every {args.bad_every}th "
                "request malformed",
                flush=True,
            )
            rows = []
            for conc in args.levels:
                rows.append(
                    await level(
                        client, f"{base}/v1/classify", images, conc, args.requests, args.seconds, args.bad_every
                    )
                )
            health = (await client.get(f"{base}/health")).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("\n| concurrency | ok requests | malformed (4xx) | throughput (req/s) | p50 ms | p90 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        bad = sum(v for k, v in r["codes"].items() if 400 <= k < 500)
        print(
            f"| {r['concurrency']} | {r['ok']} | {r['malformed']} ({bad}) | {r['throughput_rps']:.1f} | "
            f"{r['p50_ms']:.1f} | {r['p90_ms']:.1f} | {r['p99_ms']:.1f} |"
        )
    print(f"\nserver after load: {health}")
    survived = health["status"] == "ok" and all(500 not in r["codes"] for r in rows)
    print("server survived malformed requests mid-load:", survived)
    return 0 if survived else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--images", required=True, help="folder of .jpg files to send")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--bad-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
