"""Fence a simulated host: its PE process *is* the host when VMs run on libvirt's test
driver (they live in that process). Used by the demo and the failover tests through the
``command`` stonith plugin::

    --stonith=command --stonith-option="command=python -m xenpool.tools.fence_process {pidfile}"

Sends SIGKILL and exits 0 once the process is gone (or a zombie: nothing runs), 1 if
it could not be confirmed.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m xenpool.tools.fence_process PIDFILE", file=sys.stderr)
        return 2
    try:
        pid = int(open(args[0]).read().split()[0])
    except (OSError, ValueError, IndexError) as err:
        print(f"cannot read a pid from {args[0]}: {err}", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 5
    while not gone(pid):
        if time.monotonic() > deadline:
            print(f"process {pid} still runs after SIGKILL", file=sys.stderr)
            return 1
        time.sleep(0.01)
    print(f"process {pid} is off")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
