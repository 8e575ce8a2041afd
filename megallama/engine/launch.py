"""The torchrun launcher behind every multi-rank command (doctor, verify, sft).

One process per rank: `--nproc-per-node` defaults to TP x PP (x DP). Multi-node runs honour the usual
NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT variables; extra torchrun arguments pass through after `--`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(target: list[str], *, nproc: int, extra: list[str] | None = None) -> list[str]:
    """`python -m torch.distributed.run ... <target>`; `target` is e.g. ["-m", "megallama.engine.smoke"]."""
    nnodes = int(os.environ.get("NNODES", "1"))
    if nnodes > 1 and not os.environ.get("MASTER_ADDR"):
        from megallama.errors import InputError

        raise InputError(f"NNODES={nnodes}: set MASTER_ADDR (and MASTER_PORT, default 29500) to the address of "
                         "node 0 on every node")
    port = os.environ.get("MASTER_PORT") or ("29500" if nnodes > 1 else str(free_port()))
    cmd = [sys.executable, "-m", "torch.distributed.run",
           f"--nproc-per-node={nproc}",
           f"--nnodes={nnodes}",
           f"--node-rank={os.environ.get('NODE_RANK', '0')}",
           f"--master-addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
           f"--master-port={port}"]
    cmd += list(extra or [])
    return cmd + list(target)


def launch_env(nproc: int = 1) -> dict[str, str]:
    """Environment for the ranks: the cores shared out between the local ranks (at least one thread each)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_torchrun(target: list[str], *, nproc: int, extra: list[str] | None = None,
                 capture: bool = False) -> subprocess.CompletedProcess:
    """Run `target` on `nproc` local ranks and wait. Output streams through unless `capture`.

    torchrun and its ranks get a process group of their own: if this process is interrupted (Ctrl-C, SIGTERM),
    the whole group is stopped with it, not just torchrun (whose ranks would run on as orphans).
    """
    cmd = torchrun_command(target, nproc=nproc, extra=extra)
    pipe = subprocess.PIPE if capture else None
    proc = subprocess.Popen(cmd, env=launch_env(nproc), text=True, stdout=pipe, stderr=pipe, start_new_session=True)
    try:
        stdout, stderr = proc.communicate()
    except BaseException:
        stop_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to torchrun and its ranks (torchrun then stops its ranks itself); SIGKILL whatever is left."""
    from megallama.staging import signals_deferred

    with signals_deferred():  # a second Ctrl-C must not cut this short and leave ranks behind
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def is_torchrun_worker() -> bool:
    return "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ


def stream_torchrun(target: list[str], *, nproc: int, on_line, extra: list[str] | None = None,
                    keep: int = 40) -> tuple[int, list[str]]:
    """Run `target` on `nproc` local ranks, handing each output line (stdout and stderr merged) to `on_line`.

    `on_line(line)` returns True for lines it consumed (progress events); the last `keep` other lines come back
    with the exit code, for the error message. Merging both streams into one pipe that is read to the end means
    no rank can block on a full pipe.
    """
    import collections

    cmd = torchrun_command(target, nproc=nproc, extra=extra)
    tail: collections.deque[str] = collections.deque(maxlen=keep)
    proc = subprocess.Popen(cmd, env=launch_env(nproc), text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            bufsize=1, start_new_session=True)  # its own group: stopped whole, as in run_torchrun
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if not on_line(line) and line.strip():
                tail.append(line)
        proc.wait()
    except BaseException:
        stop_group(proc)
        raise
    finally:
        proc.stdout.close()
    return proc.returncode, list(tail)
