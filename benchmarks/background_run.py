"""Foreground work beside a long training run in the background: what `nice` does and does not protect.

    python benchmarks/background_run.py                 # 5 alternating rounds of 6 steps each
    python benchmarks/background_run.py --rounds 9

The foreground is the paper's nin_mnist training step (fp32 by default: the same arithmetic on every host; batch
128, channels_last). The background is the same step in a loop in another process at `nice -n 15`, as a reproduce
run is started, stopped (SIGSTOP) whenever it should not run. Per round, in turn:

- alone:       the foreground on all cores, the background stopped (the baseline);
- beside, same session: the background running on all cores at nice 15, started from this process's session;
- beside, own session:  the same, started in a session of its own (`setsid`, as `nohup setsid nice -n 15 ...`
               starts a run that outlives its shell, and as every terminal window is): where the kernel groups
               processes by session (`/proc/sys/kernel/sched_autogroup_enabled` = 1, the default of most
               distributions), CPU time is shared between the groups first, and nice only orders processes inside
               one group, so the background takes half the CPU whatever its nice;
- own session, group nice 19: the same with its group's nice raised (`echo 19 > /proc/PID/autogroup`);
- split cores: the foreground pinned to the first half of the cores, a background with as many threads pinned to
               the other half, each with that many threads.

Prints the foreground's images/s in each (median of the rounds) and the ratio to `alone`. Linux only (affinity).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from nin.engine import recipe
from nin.models import get_model
from nin.runtime import keep_freed_memory, select_precision

BACKGROUND = """
import os, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from nin.engine import recipe
from nin.models import get_model
model = get_model(recipe("paper", "mnist").model).to(memory_format=torch.channels_last)
x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last); y = torch.randint(0, 10, (128,))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
print("ready", flush=True)
while True:
    opt.zero_grad(); torch.nn.functional.cross_entropy(model(x), y).backward(); opt.step()
"""


def _background(threads: int, cores: set[int] | None = None, session: bool = False,
                group_nice: int | None = None) -> subprocess.Popen:
    command = ["nice", "-n", "15", sys.executable, "-c", BACKGROUND, str(threads)]
    if cores is not None:
        command = ["taskset", "-c", ",".join(map(str, sorted(cores))), *command]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=session)
    if proc.stdout.readline().strip() != "ready":
        raise SystemExit(f"background process did not start: {command}")
    proc.send_signal(signal.SIGSTOP)
    if group_nice is not None:
        Path(f"/proc/{proc.pid}/autogroup").write_text(str(group_nice))
    return proc


def _autogroups() -> bool:
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per side and round (default 6)")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    keep_freed_memory()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("background_run.py: needs at least 2 cores")
    half = len(cores) // 2
    mine, theirs = set(cores[:half]), set(cores[half:2 * half])
    dtype = select_precision(args.dtype, torch.device("cpu"))
    all_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {len(cores)} cores, {str(dtype or torch.float32)[6:]}, "
          f"{args.rounds} rounds of {args.steps} steps per side")
    torch.manual_seed(0)
    model = get_model(recipe("paper", "mnist").model).to(memory_format=torch.channels_last)
    x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    groups = _autogroups()
    print(f"session autogroups: {'on' if groups else 'off (the two session rows should match the first)'}")
    started: list[subprocess.Popen] = []  # every background process, killed at the end whatever happens

    def background(*args, **kwargs) -> subprocess.Popen:
        started.append(_background(*args, **kwargs))
        return started[-1]

    times: dict[str, list[float]] = {}
    try:
        backgrounds = {"beside, same session": background(all_threads),
                       "beside, own session": background(all_threads, session=True)}
        if groups:
            backgrounds["own session, group nice 19"] = background(all_threads, session=True, group_nice=19)
        sides = {"alone": (None, all_threads, set(cores)),
                 **{name: (proc, all_threads, set(cores)) for name, proc in backgrounds.items()},
                 "split cores": (background(half, theirs), half, mine)}
        times = {side: [] for side in sides}
        for round_ in range(args.rounds + 1):  # the first round warms up
            for side, (proc, threads, affinity) in sides.items():
                torch.set_num_threads(threads)
                os.sched_setaffinity(0, affinity)
                if proc is not None:
                    proc.send_signal(signal.SIGCONT)
                    time.sleep(0.5)
                step()
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                if round_:
                    times[side].append((time.perf_counter() - start) / args.steps)
                if proc is not None:
                    proc.send_signal(signal.SIGSTOP)
    finally:
        for proc in started:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()
    alone = 128 / statistics.median(times["alone"])
    for side, (_, threads, affinity) in sides.items():
        speed = 128 / statistics.median(times[side])
        print(f"{side:<28} {threads} threads on {len(affinity)} cores   {speed:6.0f} img/s   "
              f"/ alone {speed / alone:.2f}")


if __name__ == "__main__":
    main()
