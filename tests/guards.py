"""Test guards shared by the reliability tests."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


@contextlib.contextmanager
def no_hang(seconds: int = 20):
    """Fail a test with TimeoutError where the code under test would hang (SIGALRM; the main thread only)."""
    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(weights: str, *flags: str, env: dict | None = None):
    """`nin serve weights [flags]` in a subprocess on a free port, answering /health: yields (URL, process); stops
    it after. A server that exits or stays silent for 120 s fails the test with the end of its stderr."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "nin", "serve", weights, "--port", str(port), *flags], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    process.kill()
                    pytest.fail(f"nin serve did not start: {process.stderr.read().decode()[-2000:]}")
                time.sleep(0.3)
        yield url, process
    finally:
        process.terminate()
        process.wait(timeout=30)
