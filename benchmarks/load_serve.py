"""A bounded load test of `nin serve` on loopback: 8 concurrent clients, 500 requests in all, then it stops.

    PYTHONPATH=src python benchmarks/load_serve.py                      # starts its own server on a free port
    PYTHONPATH=src python benchmarks/load_serve.py --url http://127.0.0.1:8000 --requests 200

Each request uploads one real CIFAR-10 test image (PNG, multipart, as the web page does) over a kept-alive
connection per client. Prints p50/p99 latency, throughput and the error count; exits non-zero on any error.
With --batching it first measures whether micro-batching could pay: 8 one-image forwards against one
forward of 8 images, on the module nin serve runs.
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOUNDARY = "nin-load-test-boundary"


def _png(data_dir: str | None, index: int) -> bytes:
    from PIL import Image

    from nin.data import load_dataset

    images = load_dataset("cifar10-lossless-first1000", "test", data_dir).images  # test image 0: a cat
    buffer = io.BytesIO()
    Image.fromarray(images[index].permute(1, 2, 0).numpy()).save(buffer, "PNG")
    return buffer.getvalue()


def _multipart(png: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"test.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{BOUNDARY}--\r\n".encode()


def _start_server(weights: str, threads: int | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "nin", "serve", weights, "--port", str(port)]
    command += ["--threads", str(threads)] if threads else []
    process = subprocess.Popen(command, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            return process, url
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise SystemExit("nin serve did not start")
            time.sleep(0.3)


def load_test(url: str, body: bytes, requests: int, concurrency: int) -> dict:
    """POST ``body`` to url/predict ``requests`` times from ``concurrency`` threads; latencies in ms."""
    parsed = urllib.parse.urlsplit(url)
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}

    def client() -> None:
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
        while True:
            with lock:
                if next(counter, None) is None:
                    break
            start = time.perf_counter()
            try:
                connection.request("POST", "/predict?top_k=5", body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                ok = response.status == 200 and b'"top"' in payload
            except OSError as error:
                ok, payload = False, repr(error).encode()
                connection.close()
                connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
            elapsed = (time.perf_counter() - start) * 1e3
            with lock:
                (latencies if ok else errors).append(elapsed if ok else payload[:200].decode(errors="replace"))
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    ordered = sorted(latencies)

    def percentile(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")

    return {"requests": requests, "concurrency": concurrency, "ok": len(latencies), "errors": len(errors),
            "first_error": errors[0] if errors else None, "seconds": seconds,
            "requests_per_second": len(latencies) / seconds, "p50_ms": percentile(50), "p99_ms": percentile(99),
            "mean_ms": statistics.fmean(latencies) if latencies else float("nan")}


def batching_gain(weights: str, batch: int = 8, repeats: int = 20) -> dict:
    """Seconds for ``batch`` one-image forwards against one forward of ``batch`` images (medians)."""
    import torch

    from nin.deploy.export import build_exported

    module, _ = build_exported(weights)
    config = module.model.config
    images = torch.randint(0, 256, (batch, config.in_channels, config.input_size, config.input_size), dtype=torch.uint8)
    singles, together = [], []
    with torch.no_grad():
        for _ in range(3):
            module(images), module(images[:1])
        for _ in range(repeats):
            start = time.perf_counter()
            for i in range(batch):
                module(images[i : i + 1])
            singles.append(time.perf_counter() - start)
            start = time.perf_counter()
            module(images)
            together.append(time.perf_counter() - start)
    one_by_one, batched = statistics.median(singles), statistics.median(together)
    return {"batch": batch, "one_by_one_ms": one_by_one * 1e3, "batched_ms": batched * 1e3,
            "speedup": one_by_one / batched}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--weights", default=str(REPO / "weights" / "fast-cifar10.safetensors"))
    parser.add_argument("--url", help="an already running nin serve (default: start one on a free loopback port)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--data-dir", help="data root with cifar-10-test-lossless-first1000 (default: $NIN_DATA)")
    parser.add_argument("--batching", action="store_true", help="also measure what micro-batching could gain")
    parser.add_argument("--threads", type=int, help="nin serve --threads (and the batching measurement's)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.batching:
        gain = batching_gain(args.weights)
        print(f"micro-batching: {gain['batch']} one-image forwards {gain['one_by_one_ms']:.1f} ms, one forward of "
              f"{gain['batch']} images {gain['batched_ms']:.1f} ms, speedup {gain['speedup']:.2f}x")
    body = _multipart(_png(args.data_dir, 0))
    process, url = (None, args.url) if args.url else _start_server(args.weights, args.threads)
    try:
        load_average = os.getloadavg()[0]
        result = load_test(url, body, args.requests, args.concurrency)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    print(f"{result['ok']}/{result['requests']} ok, {result['errors']} errors, concurrency {result['concurrency']}: "
          f"{result['requests_per_second']:.1f} requests/s, latency p50 {result['p50_ms']:.1f} ms, "
          f"p99 {result['p99_ms']:.1f} ms (load average {load_average:.1f} at start, {os.cpu_count()} cores)")
    if result["errors"]:
        print(f"first error: {result['first_error']}")
    raise SystemExit(1 if result["errors"] else 0)
