"""Load test of ``python -m vision_peft serve`` on loopback, for any task's bundle: throughput and latency
percentiles at concurrency 1, 4 and 16, with malformed requests mixed in mid-load (garbage bytes, a wrong file
type or field, a missing part); every malformed request must get a 4xx, every good one a 200, and the server
must keep answering.

Traffic goes to 127.0.0.1 only, bounded in count (``--requests`` per level) and time (``--seconds`` per level).

    python bench/load_test.py runs/<run>/export --inputs ../shared/data/aid/Beach            # classification
    python bench/load_test.py runs/<fewshot run>/export --inputs ../shared/data/aid          # fewshot: class folders
    python bench/load_test.py runs/<pointcloud run>/export --inputs ../shared/data/modelnet10/chair/test
    python bench/load_test.py runs/<refseg run>/export --inputs ../shared/data/coco128-seg/images --phrase "a dog"
    python bench/load_test.py runs/<diffusion run>/export --steps 10 --requests 20          # no inputs needed
    python bench/load_test.py packs/aid --inputs ../shared/data/aid/Beach --adapters all     # an adapter pack

With ``--adapters all`` (or ``--adapters a,b,c``) the good requests of an adapter pack go round-robin to its
adapters (the ``adapter`` query parameter, names from ``/info``; each adapter's request builder gets that
adapter's labels), each malformed one carries an adapter too, and a fourth malformed kind asks for an adapter
the pack does not have (must be 404). Without the option nothing changes. ``--json-out`` writes the rows, the
per-adapter counts and the server process's resident memory (``VmRSS`` / peak ``VmHWM`` after the load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from vision_peft.runtimes.base import LoadTestOptions, LoadTestRequests, runtime_for_task


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


UNKNOWN_ADAPTER = "no-such-adapter"  # the malformed kind 3 of a pack load test


def server_memory(pid: int) -> dict[str, int]:
    """Resident memory of a process in bytes (``VmRSS`` now, ``VmHWM`` its peak; Linux ``/proc``; {} elsewhere)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


class AdapterSpread:
    """The requests of a pack load test: the good requests go round-robin to the adapters (query parameter
    ``adapter``), the malformed ones to adapter ``kind mod N``."""

    def __init__(self, works: dict[str, LoadTestRequests]) -> None:
        self.works, self.names = works, list(works)
        self.route = next(iter(works.values())).route
        self.sent = dict.fromkeys(self.names, 0)

    @staticmethod
    def _with(req: dict, name: str) -> dict:
        return {**req, "params": {**(req.get("params") or {}), "adapter": name}}

    def good(self, i: int) -> dict:
        name = self.names[sum(self.sent.values()) % len(self.names)]  # round-robin over the good requests
        self.sent[name] += 1
        return self._with(self.works[name].good(i), name)

    def malformed(self, kind: int) -> dict:
        name = self.names[kind % len(self.names)]
        if kind == 3:  # a good request for an adapter the pack does not have
            return self._with(self.works[name].good(0), UNKNOWN_ADAPTER)
        return self._with(self.works[name].malformed(kind), name)


async def level(
    client: httpx.AsyncClient, url: str, work: LoadTestRequests, conc: int, n: int, seconds: float, bad_every: int,
    bad_kinds: int = 3,
) -> dict:  # fmt: skip
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
            if malformed:
                req = work.malformed((i // bad_every) % bad_kinds)
                bad_sent += 1
            else:
                req = work.good(i)
            t0 = time.perf_counter()
            r = await client.post(url, **req)
            dt = time.perf_counter() - t0
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if malformed:
                if not 400 <= r.status_code < 500:
                    raise RuntimeError(f"malformed request answered {r.status_code} (want 4xx): {r.text[:200]}")
            else:
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
            runtime = runtime_for_task(info["task"])
            if runtime is None:
                raise SystemExit(f"no runtime serves task {info['task']!r}; nothing to load-test")
            if runtime.load_test_inputs and not args.inputs:
                raise SystemExit(f"a {info['task']} bundle needs --inputs: {runtime.load_test_inputs}")
            inputs = Path(args.inputs) if args.inputs else None

            def builder(labels: list[str]) -> LoadTestRequests:
                labels = tuple(c for c in labels or [] if not c.startswith("<"))  # not the CFG null class
                return runtime.load_test_request(
                    inputs, LoadTestOptions(phrase=args.phrase, steps=args.steps, labels=labels)
                )

            spread = None
            if args.adapters:
                known = {a["name"]: a for a in info.get("adapters") or []}
                if not info.get("pack"):
                    raise SystemExit(f"--adapters: {args.bundle} is a merged bundle, not an adapter pack")
                names = list(known) if args.adapters == "all" else args.adapters.split(",")
                unknown = [n for n in names if n not in known]
                if unknown:
                    raise SystemExit(f"--adapters: {unknown} are not in the pack (it has {sorted(known)})")
                spread = AdapterSpread({n: builder(known[n]["labels"]) for n in names})
                work = spread
            else:
                work = builder(info.get("labels"))
            print(
                f"bundle {args.bundle}: task {info['task']} → {work.route}, providers {info['providers']}, "
                f"{args.requests} requests/level (≤ {args.seconds:.0f} s), every {args.bad_every}th request malformed"
                + (f", spread over adapters {spread.names}" if spread else ""),
                flush=True,
            )
            rows = []
            for conc in args.levels:
                rows.append(
                    await level(client, base + work.route, work, conc, args.requests, args.seconds, args.bad_every,
                                4 if spread else 3)
                )  # fmt: skip
            health = (await client.get(f"{base}/health")).json()
            memory = server_memory(server.pid)
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
    if memory:
        print(f"server memory after load: RSS {memory.get('VmRSS', 0) / 2**20:.1f} MiB, "
              f"peak {memory.get('VmHWM', 0) / 2**20:.1f} MiB")  # fmt: skip
    if spread:
        print("requests per adapter:", json.dumps(spread.sent))
    survived = health["status"] == "ok" and all(k < 500 for r in rows for k in r["codes"])
    print("server survived malformed requests mid-load:", survived)
    if args.json_out:
        out = {"bundle": str(args.bundle), "route": work.route, "levels": rows, "health": health,
               "server_memory": memory, "adapters": spread.sent if spread else None, "survived": survived,
               "threads": args.threads}  # fmt: skip
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if survived else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument(
        "--inputs", "--images", default=None,
        help="what to send (by the bundle's task: its runtime's load_test_inputs, e.g. .jpg images, class folders "
        "of .jpg, point files; generating tasks need none)",
    )  # fmt: skip
    ap.add_argument("--phrase", default=LoadTestOptions.phrase, help="phrase-taking endpoints: the phrase per image")
    ap.add_argument("--steps", type=int, default=LoadTestOptions.steps, help="generating endpoints: sampler steps")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--bad-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--adapters", default=None,
        help="an adapter pack: spread the requests over its adapters ('all' from /info, or a,b,c)",
    )  # fmt: skip
    ap.add_argument("--json-out", default=None, help="write the results (rows, server memory) to this JSON file")
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
