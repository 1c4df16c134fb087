"""DDP on this CPU: two gloo processes on 127.0.0.1 (torch.multiprocessing.spawn), one thread each.

One spawn (a module fixture) runs every distributed job; the workers write what they computed into a
temporary folder and the tests compare it with one process doing the same work. Checks: sharding, DDP
optimizer steps == steps on the global batch, every test image counted once, bit-exact resume under DDP,
resuming with a different number of processes, and torchrun launches (missing data, a graceful stop). About 50 s of
CPU time.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nin import distributed
from nin.checkpoint import load_state
from nin.pretrained import load
from nin.data import TensorLoader, load_dataset
from nin.data.loader import shard_indices
from nin.evaluate import evaluate
from nin.models import get_model
from nin.engine import TrainConfig, make_optimizer, recipe, train, train_step

from small_models import TINY_NIN_BLOCKS

WORLD = 2


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    # what torchrun sets; distributed.setup() then joins a gloo group (no CUDA here, or forced to the CPU)
    # and, as under torchrun, the rendezvous store is the launcher's (`_spawn`): rank 0 joins it, not opens it
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1",
                       "TORCHELASTIC_USE_AGENT_STORE": "True"})
    faulthandler.enable(all_threads=True)  # an abort prints every thread's Python stack, not one line
    torch.set_num_threads(1)
    device = distributed.setup(torch.device("cpu"))
    assert device.type == "cpu" and dist.get_backend() == "gloo"
    assert (distributed.rank(), distributed.world_size()) == (rank, world)
    try:
        fn(rank, *args)
    finally:
        distributed.cleanup()
    # Done, and everything written: leave without the interpreter's teardown. Under the CI's load, 2 full runs in
    # 6 lost rank 1 after its work to SIGABRT ("terminate called without an active exception", the message of a C++
    # thread stopped while the interpreter finalizes); 40 runs of this module alone under load never showed it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _spawn(fn, *args, world: int = WORLD) -> None:
    # The rendezvous store lives here, as torchrun's agent holds it, on a port bound before any worker starts: a
    # port only found free (and opened later by rank 0) could be taken meanwhile by a test's server, and rank 1
    # then talked to that server and aborted ("terminate called without an active exception", a CI run under load).
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    mp.spawn(_entry, args=(world, store.port, fn, args), nprocs=world, join=True)


def _quiet(*_args) -> None:
    pass


# ---------------------------------------------------------------------------------------------
# Sharding: the same permutation, disjoint equal-length shards
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3])
def test_shards_are_disjoint_equal_slices_of_one_permutation(world):
    size = 1001
    shards = [shard_indices(size, shuffle=True, seed=5, epoch=2, rank=r, world_size=world) for r in range(world)]
    assert {len(s) for s in shards} == {size // world}  # equal steps on every rank
    flat = torch.cat(shards)
    assert len(set(flat.tolist())) == len(flat)  # disjoint
    permutation = torch.stack(shards, dim=1).reshape(-1)  # interleaving the shards gives back the permutation
    single = shard_indices(size, shuffle=True, seed=5, epoch=2, rank=0, world_size=1)
    assert torch.equal(permutation, single[: len(permutation)])
    evaluation = torch.cat([shard_indices(size, shuffle=False, seed=0, epoch=0, rank=r, world_size=world)
                            for r in range(world)])
    assert sorted(evaluation.tolist()) == list(range(size))  # evaluation: every image exactly once


# ---------------------------------------------------------------------------------------------
# One spawn of two gloo workers does all the distributed work; the tests below read what it wrote
# ---------------------------------------------------------------------------------------------

B, STEPS = 8, 2
STEP_CFG = TrainConfig(model="nin_mnist", precision="fp32", momentum=0.9, weight_decay=1e-4)
N_EVAL = 333  # odd: rank 0 gets 167 images, rank 1 166; batches of 83 give them 3 and 2 batches
TINY = TINY_NIN_BLOCKS  # a small NiN: these tests run on 2 shared cores


def _global_batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(WORLD * B, 1, 28, 28, generator=generator), torch.randint(0, 10, (WORLD * B,), generator=generator))
            for _ in range(STEPS)]


def _fresh_model() -> nn.Module:
    torch.manual_seed(0)
    return get_model("nin_mnist", batch_norm=False, dropout=0.0).to(memory_format=torch.channels_last)


def _eval_data():
    generator = torch.Generator().manual_seed(2)
    return torch.randn(N_EVAL, 1, 28, 28, generator=generator), torch.randint(0, 10, (N_EVAL,), generator=generator)


def _eval_model() -> nn.Module:
    torch.manual_seed(3)
    return get_model("nin_mnist", batch_norm=True, dropout=0.0)


def _tiny_fast(data_dir: str, **changes) -> TrainConfig:
    fast = recipe("fast", "mnist")
    return dataclasses.replace(fast, data_dir=data_dir, model_args={**fast.model_args, "blocks": TINY}, **changes)


def _resume_cfg(data_dir: str) -> TrainConfig:
    # 192 images in batches of 16: 6 steps per rank and epoch with 2 processes, 12 with one
    cfg = _tiny_fast(data_dir, train_subset=192, eval_subset=100, batch_size=16, epochs=2, checkpoint_every=4)
    return dataclasses.replace(cfg, model_args={**cfg.model_args, "dropout": 0.5})  # dropout: the RNG must resume too


def _workers(rank: int, out: str, data_dir: str | None) -> None:
    # (a) STEPS DDP steps, each rank on its half of the global batch
    model = _fresh_model()
    optimizer = make_optimizer(model, STEP_CFG)
    ddp = nn.parallel.DistributedDataParallel(model)
    for images, labels in _global_batches():
        mine = slice(rank * B, (rank + 1) * B)
        loss, _ = train_step(ddp, optimizer, images[mine], labels[mine], lr=0.05, cfg=STEP_CFG, amp_dtype=None)
        assert loss is not None
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/step{rank}.pt")
    # a non-finite loss on one rank stops every rank at the same step: none steps, none waits forever
    bad = images[mine].clone()
    if rank == 1:
        bad[0] = float("nan")
    loss, _ = train_step(ddp, optimizer, bad, labels[mine], lr=0.05, cfg=STEP_CFG, amp_dtype=None)
    assert loss is None, f"rank {rank} stepped on a non-finite loss"
    assert not distributed.all_true(rank == 0) and distributed.all_true(True)

    # (b) evaluate() on uneven shards and uneven batch counts
    images, labels = _eval_data()
    loader = TensorLoader(images, labels, 83, shuffle=False, rank=rank, world_size=WORLD)
    assert len(loader) == (3 if rank == 0 else 2)
    result = evaluate(_eval_model(), loader, num_classes=10)
    torch.save({"confusion": result.confusion, "loss": result.loss}, f"{out}/eval{rank}.pt")
    if data_dir is None:
        return

    # (b) the same through train(): batch-norm statistics differ per rank until rank 0's are broadcast
    cfg = _tiny_fast(data_dir, train_subset=256, eval_subset=N_EVAL, batch_size=32, epochs=1, precision="fp32",
                     eval_batch_size=83)
    train(cfg, f"{out}/eval-run", log=_quiet)

    # (c) uninterrupted, interrupted, resumed
    cfg = _resume_cfg(data_dir)
    train(cfg, f"{out}/full", log=_quiet)
    try:
        train(cfg, f"{out}/cut", log=_quiet, interrupt_after=9)  # last checkpoint: step 8, mid-epoch 2
        raise AssertionError("interrupt_after did not interrupt")
    except KeyboardInterrupt:
        pass
    distributed.barrier()
    if rank == 0:
        shutil.copytree(f"{out}/cut", f"{out}/cut-for-1")  # a 2-process mid-epoch checkpoint for (d)
    distributed.barrier()
    train(None, f"{out}/cut", resume=True, log=_quiet)

    # (d) a 1-process mid-epoch checkpoint (written by the test process) resumed by 2 processes
    messages: list[str] = []
    train(None, f"{out}/single-for-2", resume=True, log=messages.append)
    if rank == 0:  # only rank 0 logs
        with open(f"{out}/messages-2.json", "w") as f:
            json.dump(messages, f)


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    root = Path(os.environ.get("NIN_DATA", ""))
    data_dir = str(root) if (root / "mnist").is_dir() else None
    if data_dir is not None:
        with pytest.raises(KeyboardInterrupt):  # 12 steps per epoch in one process; last checkpoint at step 16
            train(_resume_cfg(data_dir), out / "single-for-2", log=_quiet, interrupt_after=17)
    _spawn(_workers, str(out), data_dir)
    return out


# ---------------------------------------------------------------------------------------------
# (a) one DDP step on 2 × B images == one step of one process on the 2B-image global batch
# ---------------------------------------------------------------------------------------------

def test_ddp_step_equals_one_process_on_the_global_batch(ddp_out):
    model = _fresh_model()
    optimizer = make_optimizer(model, STEP_CFG)
    for images, labels in _global_batches():  # F.cross_entropy's mean over 2B = DDP's average of the two B-means
        train_step(model, optimizer, images, labels, lr=0.05, cfg=STEP_CFG, amp_dtype=None)
    rank0, rank1 = torch.load(ddp_out / "step0.pt"), torch.load(ddp_out / "step1.pt")
    start = _fresh_model().state_dict()
    for name, single in model.state_dict().items():
        assert torch.equal(rank0[name], rank1[name]), name  # DDP keeps the replicas identical
        assert not torch.equal(single, start[name]), name  # the steps did move every weight
        # the same update: to 1% of its size (fp32 sums in another order; on AVX2-only CPUs the biases' updates,
        # sums with cancellation, differed by up to 0.2% of their size, beyond a fixed 1e-6); a DDP mistake (a
        # sum for a mean, a rank's own half-batch gradient) moves them by tens of percent
        move = single - start[name]
        torch.testing.assert_close(rank0[name] - start[name], move, rtol=0, atol=0.01 * float(move.abs().max()),
                                   msg=name)


# ---------------------------------------------------------------------------------------------
# (b) evaluation: each test image once, whatever the split into ranks and batches
# ---------------------------------------------------------------------------------------------

def test_evaluate_counts_every_image_once(ddp_out):
    images, labels = _eval_data()
    single = evaluate(_eval_model(), TensorLoader(images, labels, 500, shuffle=False), num_classes=10)
    for rank in range(WORLD):  # every rank holds the reduced numbers
        got = torch.load(ddp_out / f"eval{rank}.pt")
        assert int(got["confusion"].sum()) == N_EVAL
        assert torch.equal(got["confusion"], single.confusion)
        assert got["loss"] == pytest.approx(single.loss, rel=1e-5)


def test_training_run_evaluates_every_image_once(data_root, ddp_out):
    run = ddp_out / "eval-run"
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    wrong = record["test_error"] * N_EVAL  # the logged error has denominator 333
    assert wrong == pytest.approx(round(wrong), abs=1e-6)
    model, preprocessing, _ = load(run)  # rank 0's weights and batch-norm statistics
    test = load_dataset("mnist", "test", str(data_root))
    x, y = preprocessing(test.images[:N_EVAL]), test.labels[:N_EVAL]
    again = evaluate(model, TensorLoader(x, y, 500, shuffle=False), num_classes=10)
    assert again.n == N_EVAL
    assert abs(round(wrong) - (N_EVAL - again.correct)) <= 1  # equal but for a float near-tie in an argmax
    assert json.loads((run / "config.json").read_text())["world_size"] == WORLD
    _, meta = load_state(run / "checkpoint.safetensors")
    assert meta["world_size"] == WORLD and meta["step"] == 256 // WORLD // 32


# ---------------------------------------------------------------------------------------------
# (c) resume under DDP: bit-identical to the uninterrupted run; (d) resume with another world size
# ---------------------------------------------------------------------------------------------

def _weights(run) -> dict[str, torch.Tensor]:
    tensors, _ = load_state(run / "checkpoint.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def _metrics(run) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(l).items() if "time" not in k and "per_s" not in k} for l in lines]


def test_resumed_ddp_run_is_bit_identical(data_root, ddp_out):
    full, cut = _weights(ddp_out / "full"), _weights(ddp_out / "cut")
    assert full and all(torch.equal(full[k], cut[k]) for k in full)
    assert _metrics(ddp_out / "full") == _metrics(ddp_out / "cut")  # train loss/error summed over both ranks too
    _, meta = load_state(ddp_out / "full" / "checkpoint.safetensors")
    assert (meta["epoch"], meta["step"], meta["world_size"]) == (2, 12, 2)


def test_resume_with_fewer_processes_restarts_the_interrupted_epoch(data_root, ddp_out):
    run = ddp_out / "cut-for-1"
    _, before = load_state(run / "checkpoint.safetensors")
    assert (before["epoch"], before["batches_done"], before["step"], before["world_size"]) == (1, 2, 8, 2)
    messages: list[str] = []
    train(None, run, resume=True, log=messages.append)
    assert any("restarts from its first batch" in m and "from 32 to 16" in m for m in messages)
    _, after = load_state(run / "checkpoint.safetensors")
    assert (after["epoch"], after["batches_done"], after["step"], after["world_size"]) == (2, 0, 24, 1)
    assert [r["epoch"] for r in _metrics(run)] == [1, 2]


def test_resume_with_more_processes_restarts_the_interrupted_epoch(data_root, ddp_out):
    messages = json.loads((ddp_out / "messages-2.json").read_text())
    assert any("restarts from its first batch" in m and "from 16 to 32" in m for m in messages)
    _, after = load_state(ddp_out / "single-for-2" / "checkpoint.safetensors")
    assert (after["epoch"], after["batches_done"], after["step"], after["world_size"]) == (2, 0, 12, 2)
    assert [r["epoch"] for r in _metrics(ddp_out / "single-for-2")] == [1, 2]


# ---------------------------------------------------------------------------------------------
# A launch where one process stops: its error once, the others one line each, no traceback per rank
# ---------------------------------------------------------------------------------------------

def test_lost_peer_names_a_collective_failed_by_another_process(monkeypatch):
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:59554. This is typically caused by a remote worker crashing.")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.lost_peer(gloo) is None  # one process: nothing to lose, the error stays what it is
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    line = distributed.lost_peer(gloo)
    assert line.startswith("rank 3 of 4: lost its connection to another process of this run (connection closed by "
                           "peer), so it stops too")
    assert "pair.cc" not in line and "\n" not in line
    assert distributed.lost_peer(RuntimeError("recv: Connection reset by peer")).startswith("rank 3 of 4: lost its")
    assert distributed.lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None  # a bug stays one
    assert distributed.lost_peer(dist.DistBackendError("NCCL error: invalid usage")) is None  # ours, perhaps: traceback
    assert distributed.lost_peer(ValueError("Connection closed by peer")) is None
    store = dist.DistStoreError("wait timeout after 30000ms, keys: /rank0\nmore")
    assert distributed.lost_peer(store) == "rank 3 of 4: the process group failed: wait timeout after 30000ms, keys: /rank0 more"


def test_the_cli_says_a_lost_peer_in_one_line_even_when_interrupted_meanwhile(monkeypatch, capsys):
    """The peer line waits a second (torchrun names the first process to stop); a Ctrl-C in that second used to
    raise inside the except clause: the gloo traceback, "During handling of the above exception", exit 130."""
    from nin import cli

    def lose_peer(args):
        raise RuntimeError("[/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:59554")

    def interrupted(seconds):
        raise KeyboardInterrupt

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setitem(cli.COMMANDS, "evaluate", lose_peer)
    monkeypatch.setattr(cli.time, "sleep", interrupted)
    assert cli.main(["evaluate", "fast-mnist"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nin evaluate: error: rank 1 of 2: lost its connection") and err.count("\n") == 1
    monkeypatch.setitem(cli.COMMANDS, "evaluate", lambda args: 1 / 0)  # not a collective: the traceback, as before
    with pytest.raises(ZeroDivisionError):
        cli.main(["evaluate", "fast-mnist"])


class _Held:
    """Stands for the DDP model a stopped command's frames hold."""


@pytest.mark.parametrize("outcome, code, said", [
    ("stop", 130, "nin train: interrupted: stopped at step 7"),
    ("stop, stderr a closed pipe", 130, ""),  # `torchrun ... 2>&1 | tee log`, then Ctrl-C: tee is gone
    ("nin-error", 1, "nin train: error: bad flag"),
    ("lost-peer", 1, "nin train: error: rank 1 of 2: lost its connection"),
    ("bug", 1, "ZeroDivisionError"),
    ("done", 0, ""),
])
def test_a_torchrun_worker_leaves_with_its_exception_still_alive(monkeypatch, capsys, outcome, code, said):
    """A torchrun worker run as a program ends in os._exit once its outcome is printed, before the exception that
    stopped it is freed: freeing it (its frames hold the DDP model, and through it the gloo group) hung a stopped
    worker in the group's destructor until torchrun killed it 30 s later."""
    import weakref

    from nin import cli
    from nin.errors import NinError

    held = []

    def command(args):
        model = _Held()
        held.append(weakref.ref(model))
        if outcome.startswith("stop"):
            raise KeyboardInterrupt("stopped at step 7")
        if outcome == "nin-error":
            raise NinError("bad flag")
        if outcome == "lost-peer":
            raise RuntimeError("[/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:59554")
        if outcome == "bug":
            return 1 / 0
        return 0

    class Left(BaseException):
        pass

    def exit_now(status):  # os._exit returns never; this one raises, and main's guard would leave again
        if not seen:
            seen.append((status, held[0]() is not None))
        raise Left

    seen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setitem(cli.COMMANDS, "train", command)
    monkeypatch.setattr(cli.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(cli.os, "_exit", exit_now)
    monkeypatch.setattr(sys, "argv", ["nin", "train", "--dataset", "mnist"])
    with monkeypatch.context() as closed:
        if outcome == "stop, stderr a closed pipe":
            class ClosedPipe:
                def write(self, text):
                    raise BrokenPipeError(32, "Broken pipe")

                def flush(self):
                    raise BrokenPipeError(32, "Broken pipe")
            closed.setattr(sys, "stderr", ClosedPipe())
        with pytest.raises(Left):
            cli.main()  # as the `nin` program is: no argv
    assert seen == [(code, outcome != "done")]  # the exception (and what its frames hold) alive at the exit
    assert said in capsys.readouterr().err
    if outcome == "stop, stderr a closed pipe":
        return
    seen.clear()
    if outcome != "bug":  # called as a function (argv given), main returns as before
        assert cli.main(["train", "--dataset", "mnist"]) == code and seen == []
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no group, nothing to leave early
    held.clear()
    if outcome in ("stop", "nin-error"):
        assert cli.main(["train", "--dataset", "mnist"]) == code and seen == []


def test_a_graceful_stop_under_torchrun_ends_every_worker_at_once(data_root, tmp_path):
    """SIGTERM to torchrun: every worker checkpoints after the same step, says so and exits; torchrun never has to
    kill one ("Unable to shutdown process ... forcefully exiting via SIGKILL", 30 s later: the hang above)."""
    import signal
    import subprocess
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    launch = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "nin", "train", "--dataset", "mnist", "--epochs", "4", "--train-subset", "2000",
                               "--data-dir", str(data_root), "--out", str(tmp_path / "run")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    lines = []
    for line in launch.stdout:  # stop it during its second epoch
        lines.append(line)
        if line.startswith("epoch   1/4"):
            break
    launch.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    rest, _ = launch.communicate(timeout=120)
    output = "".join(lines) + rest
    assert "forcefully exiting" not in output, output
    assert time.monotonic() - stopped < 25, output  # torchrun waits 30 s before it kills a worker
    said = [line for line in output.splitlines() if line.startswith("nin train: interrupted: stopped at step")]
    assert len(said) == 2 and said[0] == said[1], output  # both ranks, after the same step
    step = int(said[0].split("stopped at step ")[1].split()[0])
    assert step > 8  # in epoch 2 (8 steps an epoch per rank)
    assert load_state(tmp_path / "run" / "checkpoint.safetensors")[1]["step"] == step


def test_a_torchrun_launch_with_missing_data_says_so_once(tmp_path):
    """Under torchrun, rank 0 stops on the missing data while rank 1 waits for it in a barrier: before, rank 1
    printed a 40-line gloo traceback ("[rank1]: ... Connection closed by peer") beside rank 0's one line."""
    import subprocess

    missing = tmp_path / "no-data"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "nin", "train", "--dataset", "mnist", "--epochs", "1", "--data-dir", str(missing),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=240, env=env,
                          cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    errors = [line for line in output.splitlines() if line.startswith("nin train: error:")]
    assert sum(str(missing) in line for line in errors) == 1, output  # rank 0's, once
    assert all(str(missing) in line or line.startswith("nin train: error: rank 1 of 2: lost its connection to another "
                                                       "process of this run") for line in errors), output
    assert "[rank1]:" not in output and "[rank0]:" not in output, output
    assert not (tmp_path / "run").exists()
