"""Load-test `lipkit serve` with and without micro-batching, in one run, and print the table.

For each mode the script starts the server on a free loopback port, waits for /health, warms it up, sends
`--requests` searches at `--concurrency` (each text query distinct — phrases made from the captions of
SOURCE — plus `--image-share` raw image uploads drawn from SOURCE's images), reads /metrics, and stops the
server. Then an overload run: a server with a small `--max-queue` under `--overload-concurrency`
clients, where every request must end in 200 or 503 (with Retry-After) — none may time out.

    python bench/bench_serve.py --checkpoint runs/demo/checkpoint

Needs the `serve` extra. The index (HNSW over SOURCE) is built into --work on first use. The load
generator is a small asyncio HTTP/1.1 keep-alive client, so the measuring side costs little CPU on the
same machine; still, client and server share the cores — report the machine's load with the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

HOME_TABLE = Path.home() / ".cache/lipkit/datasets/emoji/test-style.jsonl"
VARIANTS = ("{c}", "a picture of {c}", "{c}, drawn small", "a close-up of {c}", "{c} on a plain background")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_table(path: Path, n_images: int) -> tuple[list[str], list[bytes]]:
    """The distinct captions of a JSONL table and the bytes of its first `n_images` images."""
    captions: dict[str, None] = {}
    images: list[bytes] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        caps = row.get("captions") or row.get("caption") or []
        for c in [caps] if isinstance(caps, str) else caps:
            captions.setdefault(c.strip(), None)
        img = Path(row["image"])
        img = img if img.is_absolute() else path.parent / img
        if len(images) < n_images and img.is_file():
            images.append(img.read_bytes())
    return list(captions), images


def distinct_queries(captions: list[str], n: int, seed: int) -> list[str]:
    pool = [v.format(c=c) for v in VARIANTS for c in captions]
    pool = list(dict.fromkeys(pool))
    if len(pool) < n:
        raise SystemExit(f"only {len(pool)} distinct phrases from the table; ask for fewer --requests")
    random.Random(seed).shuffle(pool)
    return pool[:n]


class Conn:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, target: str, body: bytes = b"", ctype: str = "") -> tuple[int, dict]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = f"{method} {target} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
        if ctype:
            head += f"Content-Type: {ctype}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        await self.writer.drain()
        assert self.reader is not None
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection") == "close":
            self.close()
        return int(status_line.split()[1]), headers

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def run_load(port: int, jobs: list[tuple[str, object]], concurrency: int, timeout: float) -> dict:
    """Send every job over `concurrency` connections; latency per request, statuses, timeouts."""
    queue: asyncio.Queue = asyncio.Queue()
    for j in jobs:
        queue.put_nowait(j)
    lat: list[float] = []
    statuses: dict[int, int] = {}
    out = {"timeouts": 0, "errors": 0, "retry_after_missing": 0}

    async def worker() -> None:
        conn = Conn("127.0.0.1", port)
        while not queue.empty():
            kind, payload = queue.get_nowait()
            t0 = time.perf_counter()
            try:
                if kind == "text":
                    call = conn.request("GET", f"/search?k=10&q={quote(str(payload))}")
                else:
                    call = conn.request("POST", "/search", payload, "image/png")  # type: ignore[arg-type]
                status, headers = await asyncio.wait_for(call, timeout)
            except TimeoutError:
                out["timeouts"] += 1
                conn.close()
                continue
            except (ConnectionError, OSError, asyncio.IncompleteReadError):
                out["errors"] += 1
                conn.close()
                continue
            lat.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
            if status == 503 and "retry-after" not in headers:
                out["retry_after_missing"] += 1
        conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    lat.sort()

    def pct(p: float) -> float:
        return 1000 * lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    return {
        **out,
        "statuses": statuses,
        "wall_s": wall,
        "rps": len(lat) / wall,
        "p50_ms": pct(0.5),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
    }


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):  # `name` may carry its {labels}
            total += float(line.rsplit(" ", 1)[1])
    return total


def lipkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "lipkit", *args]


def ensure_index(ckpt: Path, source: Path, work: Path) -> Path:
    index = work / "index"
    if not (index / "manifest.json").is_file() and not any(index.glob("*")):
        subprocess.run(lipkit("embed", str(ckpt), str(source), str(work / "emb")), check=True)
        subprocess.run(lipkit("index", "build", str(work / "emb"), str(index), "--kind", "hnsw"), check=True)
    return index


class Server:
    """`lipkit serve` in a subprocess on a free loopback port, stopped on exit."""

    def __init__(self, ckpt: Path, index: Path, extra: list[str], log: Path, src: Path | None = None) -> None:
        self.port = free_port()
        self.log = log
        cmd = lipkit(
            "serve", str(ckpt), str(index), "--port", str(self.port), "--log-level", "warning", *extra
        )
        env = {**os.environ, "PYTHONPATH": str(src / "src")} if src else None  # another lipkit's source
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc; nan elsewhere)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            return r.read().decode()

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited:\n{self.log.read_text()[-2000:]}")
            try:
                self.get("/health")
                return self
            except OSError:
                time.sleep(0.3)
        raise SystemExit("the server did not answer /health within 120 s")

    def __exit__(self, *_: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def jobs_for(texts: list[str], images: list[bytes], n: int, image_share: float, seed: int) -> list:
    rng = random.Random(seed)
    out, ti = [], 0
    for _ in range(n):
        if images and rng.random() < image_share:
            out.append(("image", rng.choice(images)))
        else:
            out.append(("text", texts[ti % len(texts)]))
            ti += 1
    return out


def one_mode(
    args,
    name: str,
    extra: list[str],
    texts: list[str],
    images: list[bytes],
    index: Path,
    src: Path | None = None,
) -> dict:
    warm = jobs_for([f"warm-up {i}" for i in range(64)], images, 64, args.image_share, 1)
    jobs = jobs_for(texts, images, args.requests, args.image_share, args.seed)
    with Server(args.checkpoint, index, extra, args.work / f"server-{name.split()[0]}.log", src) as srv:
        asyncio.run(run_load(srv.port, warm, args.concurrency, args.timeout))
        cpu0, client0 = srv.cpu_seconds(), time.process_time()
        r = asyncio.run(run_load(srv.port, jobs, args.concurrency, args.timeout))
        r["server_cpu_ms"] = 1000 * (srv.cpu_seconds() - cpu0) / len(jobs)
        r["client_cpu_ms"] = 1000 * (time.process_time() - client0) / len(jobs)
        try:
            m = srv.get("/metrics")
        except OSError:  # an earlier lipkit without /metrics
            m = ""
    lookups = metric(m, "lipkit_cache_hits_total") + metric(m, "lipkit_cache_misses_total")
    r["cache_hit_rate"] = metric(m, "lipkit_cache_hits_total") / lookups if lookups else 0.0
    for kind in ("text", "image"):
        calls = metric(m, f'lipkit_batch_size_count{{kind="{kind}"}}')
        r[f"mean_{kind}_batch"] = (
            metric(m, f'lipkit_batch_size_sum{{kind="{kind}"}}') / calls if calls else 1.0
        )
    r["mode"] = name
    return r


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("runs/demo/checkpoint"))
    ap.add_argument("--source", type=Path, default=HOME_TABLE, help="JSONL captions table (queries, images)")
    ap.add_argument("--index", type=Path, help="index folder (default: built into --work)")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-serve"))
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--image-share", type=float, default=0.2)
    ap.add_argument("--timeout", type=float, default=10.0, help="client timeout per request, s")
    ap.add_argument("--modes", default="unbatched,batched")
    ap.add_argument("--overload-concurrency", type=int, default=128, help="0: skip the overload run")
    ap.add_argument("--overload-queue", type=int, default=16)
    ap.add_argument("--server-args", default="--precision bf16", help="options every server gets")
    ap.add_argument(
        "--baseline-src",
        type=Path,
        help="a checkout of an earlier lipkit (e.g. `git worktree add /tmp/base 101e043`): its server, with "
        "its default options, is measured first in the same run",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not (args.checkpoint / "model.safetensors").is_file() and not args.checkpoint.is_dir():
        raise SystemExit(f"no checkpoint at {args.checkpoint}; run `make demo` or pass --checkpoint")
    args.work.mkdir(parents=True, exist_ok=True)
    index = args.index or ensure_index(args.checkpoint, args.source, args.work)
    captions, images = read_table(args.source, 200)
    texts = distinct_queries(captions, args.requests, args.seed)
    common = shlex.split(args.server_args)
    modes = {"unbatched": ["--no-batching", *common], "batched": common}
    rows = [one_mode(args, m, modes[m], texts, images, index) for m in args.modes.split(",")]
    if args.baseline_src:
        rows.insert(
            0, one_mode(args, f"baseline {args.baseline_src}", [], texts, images, index, args.baseline_src)
        )
    if args.overload_concurrency:
        extra = ["--max-queue", str(args.overload_queue), *common]
        args.concurrency, args.requests = args.overload_concurrency, max(args.requests // 2, 500)
        rows.append(one_mode(args, "batched, overload", extra, texts[::-1], images, index))
    print_table(rows, os.getloadavg())
    result = {"rows": rows, "load": os.getloadavg()}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


def print_table(rows: list[dict], load: tuple[float, float, float]) -> None:
    print(f"\nload average after the run: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(
        "| mode | requests/s | p50 ms | p95 ms | p99 ms | statuses | timeouts | errors | cache hits "
        "| mean text / image batch | server CPU ms / request | client CPU ms / request |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        st = " ".join(f"{k}×{v}" for k, v in sorted(r["statuses"].items()))
        print(
            f"| {r['mode']} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {st} "
            f"| {r['timeouts']} | {r['errors']} | {100 * r['cache_hit_rate']:.1f} % "
            f"| {r['mean_text_batch']:.1f} / {r['mean_image_batch']:.1f} | {r['server_cpu_ms']:.1f} "
            f"| {r['client_cpu_ms']:.1f} |"
        )
    by = {r["mode"]: r for r in rows}
    if "batched" in by and "unbatched" in by:
        print(f"\nbatched / unbatched throughput: {by['batched']['rps'] / by['unbatched']['rps']:.2f}×")
    base = next((r for r in rows if r["mode"].startswith("baseline")), None)
    if base is not None and "batched" in by:
        print(f"batched / {base['mode']} throughput: {by['batched']['rps'] / base['rps']:.2f}×")


if __name__ == "__main__":
    main()
