"""Instructions per proxied request, counted by callgrind: an A/B that box noise cannot move.

On a shared 2-core box, CPU time per request moved 10-20% between two runs of the same
code, which hides any change of a few percent. Valgrind's callgrind counts the user-space
instructions the proxy executes instead. That is steadier, not exact: how many requests
one event-loop turn finds still depends on timing, and the same code counted 1-5% apart
in two runs, so compare targets counted in one run. It leaves out the kernel's share (the
same syscalls for both) and cache effects: use it to compare code, and ``make bench`` for
what a box does.

Each target runs under callgrind against nginx (bench/run_bench.py's upstream); after
300 warm-up requests the counters are zeroed, N requests are sent by 8 aiohttp clients,
and the count is dumped. Needs valgrind (``apt-get install valgrind``); about a minute
per target for N=600 (callgrind runs the proxy ~50x slower).

    .venv/bin/python bench/count_instructions.py bare gateway=. before=/path/to/old/checkout
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_bench as rb  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


async def _load(url: str, n: int, concurrency: int = 8) -> None:
    async with aiohttp.ClientSession() as session:
        left = iter(range(n))

        async def client() -> None:
            for _ in left:
                async with session.post(url + rb.PATH, data=rb.REQUEST_BODY,
                                        headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    if r.status != 200:
                        raise SystemExit(f"{url}: HTTP {r.status}")
        await asyncio.gather(*(client() for _ in range(concurrency)))


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            asyncio.run(_load(url, 1, 1))
            return
        except (aiohttp.ClientError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{url} did not come up under valgrind") from None
            time.sleep(1)


def count(name: str, source: str, upstream: str, tmp: Path, n: int) -> float:
    """Thousands of instructions per request for ``bare`` or a gateway checkout."""
    port = rb.free_port()
    out = tmp / f"{name}.callgrind"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
            sys.executable]
    env = dict(os.environ)
    if source == "bare":
        argv += [str(REPO / "bench" / "bare_proxy.py"), "--port", str(port), "--upstream",
                 upstream, "--client", "aiohttp"]
    else:
        config = tmp / f"{name}.yaml"
        config.write_text(f"listen: {{host: 127.0.0.1, port: {port}}}\n"
                          "limits: {max_concurrent: 64, max_queue: 1000}\n"
                          f"models:\n  - {{name: bench, backend: static, url: \"{upstream}\"}}\n")
        argv += ["-m", "gateway", "serve", "--config", str(config)]
        env["PYTHONPATH"] = str(Path(source).resolve())
    with open(tmp / f"{name}.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc)
        asyncio.run(_load(url, 300))
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True,
                       capture_output=True)
        asyncio.run(_load(url, n))
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True,
                       capture_output=True)
        dump = Path(f"{out}.1")
        for _ in range(50):
            if dump.exists() and "totals:" in dump.read_text():
                break
            time.sleep(0.2)
        total = int(re.search(r"^totals: (\d+)", dump.read_text(), re.M).group(1))
        return total / n / 1000
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="+",
                        help="'bare', or NAME=PATH of a gateway checkout (PATH holds gateway/)")
    parser.add_argument("-n", type=int, default=600, help="requests counted per target")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="count-instructions-"))
    nginx, upstream = rb.start_nginx(tmp)
    results: dict[str, float] = {}
    try:
        for target in args.targets:
            name, _, source = target.partition("=")
            results[name] = count(name, source or name, upstream, tmp, args.n)
            line = f"{name:12} {results[name]:8.1f} k instructions per request"
            if "bare" in results and name != "bare":
                line += f"   bare / {name} = {results['bare'] / results[name]:.3f}"
            print(line, flush=True)
    finally:
        nginx.stop()


if __name__ == "__main__":
    main()
