"""What the benchmarks share: their error, progress lines, rates, child processes and the run shell.

``xenpool bench codec|registrar|pe|failover`` each live in their own module
(``bench_codec``, ``bench_registrar``, ``bench_pe``, ``bench_failover``); none imports
another's private helpers, they all use these.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .processes import free_port

__all__ = [
    "BenchError",
    "cpu_seconds",
    "free_port",
    "progress",
    "rate",
    "run_bench",
    "spawn",
    "stop",
    "twistd_argv",
    "verdict",
]


class BenchError(Exception):
    """The bench could not measure (a process did not start, a request was refused)."""


def progress(bench: str, text: str) -> None:
    """A progress line of ``xenpool bench BENCH`` on stderr (stdout may carry JSON)."""
    print(f"bench {bench}: {text}", file=sys.stderr, flush=True)


def verdict(ok: bool) -> str:
    """A target met or missed, for a rich table."""
    return "[green]meets[/green]" if ok else "[red]misses[/red]"


def rate(fn: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds`` of process CPU time."""
    batch = 1
    while True:  # find a batch that takes at least 10 ms
        start = time.process_time()
        for _ in range(batch):
            fn()
        if time.process_time() - start >= 0.01:
            break
        batch *= 2
    calls = 0
    start = time.process_time()
    while (elapsed := time.process_time() - start) < seconds:
        for _ in range(batch):
            fn()
        calls += batch
    return calls / elapsed


# ------------------------------------------------------------------- processes


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGKILL if the bench dies without cleaning up."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(argv: list[str], **kwargs) -> subprocess.Popen:
    """A child process of the bench that dies with it (Linux)."""
    return subprocess.Popen(
        argv, preexec_fn=_die_with_parent if sys.platform == "linux" else None, **kwargs
    )


def stop(proc: subprocess.Popen) -> None:
    """Terminate ``proc``, kill it if it has not exited after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def load_generator(argv: list[str], timeout_s: float) -> dict:
    """Run a load generator process that prints its result as the last line of JSON."""
    proc = spawn(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BenchError("the load generator did not finish") from None
    finally:
        stop(proc)
        if proc.stdout is not None:  # stdout=PIPE: always
            proc.stdout.close()
    if proc.returncode != 0 or not out.strip():
        raise BenchError(f"the load generator failed (exit status {proc.returncode})")
    result = json.loads(out.splitlines()[-1])
    if "error" in result:
        raise BenchError(f"load generator: {result['error']}")
    return result


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process (Linux), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def twistd_argv() -> list[str]:
    """How to run this environment's twistd."""
    twistd = Path(sys.executable).with_name("twistd")
    if twistd.exists():
        return [str(twistd)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


# ------------------------------------------------------------------------ the shell


def run_bench(name: str, args: argparse.Namespace, measure, print_table) -> int:
    """The shell of a bench that starts processes: checks ``--seconds``, cleans up its
    children on SIGTERM too, prints JSON or a table. ``measure(seconds)`` -> result."""
    if not args.seconds > 0:
        print(
            f"xenpool bench {name}: --seconds must be positive, got {args.seconds}",
            file=sys.stderr,
        )
        return 2
    previous = signal.signal(
        signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum)
    )
    try:
        result = measure(args.seconds)
    except BenchError as err:
        print(f"xenpool bench {name}: {err}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0
