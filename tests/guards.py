"""Test guards shared by the reliability tests."""

from __future__ import annotations

import contextlib
import signal


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
