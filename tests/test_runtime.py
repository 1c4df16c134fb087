"""nin.runtime.keep_freed_memory: applied once, switchable off, and harmless to results."""

import subprocess
import sys

CHILD = """
import json, sys, torch
from nin.runtime import keep_freed_memory
first, second = keep_freed_memory(), keep_freed_memory()
torch.manual_seed(0)
x = torch.randn(64, 192, 32, 32)  # 48 MiB: above glibc's largest mmap threshold
y = (x * 2).sum().item()
print(json.dumps({"first": first, "second": second, "sum": y}))
"""


def _child(env_value: str | None) -> dict:
    import json
    import os

    env = dict(os.environ)
    env.pop("NIN_KEEP_FREED_MEMORY", None)
    if env_value is not None:
        env["NIN_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_keep_freed_memory_applies_once_and_can_be_switched_off():
    on, off = _child(None), _child("0")
    if sys.platform.startswith("linux"):
        assert on["first"] is True and on["second"] is True
    assert off["first"] is False and off["second"] is False
    assert on["sum"] == off["sum"]  # the same numbers either way
