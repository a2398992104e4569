"""The node labeller's long-lived parent: run one labelling pass (``edgevirt-node label --once``) as
a child process now and every ``--interval`` seconds, ``--retry`` seconds after a pass that failed.

The pass needs the kubernetes client, grpc and the CRI stubs (~45 MiB resident); kept for the 10
minutes between passes they were most of what the labeller DaemonSet held on every node. This
parent imports the standard library only (about 10 MiB), so between passes the node keeps that.
SIGTERM and SIGINT end the loop: at once between passes, after the pass under way (seconds; a pass
is idempotent) otherwise. Its exit code: 0 after a signal.

Usage: ``python3 -m cri_shim.node.label_loop [--interval S] [--retry S] -- COMMAND...``
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

#: a pass that runs longer than this is killed and counts as failed (the probe boots a guest with
#: its own timeout of seconds; an API server that hangs must not stop the loop for good)
PASS_TIMEOUT = 300.0


def run_pass(argv: Sequence[str], timeout: float = PASS_TIMEOUT) -> bool:
    """One pass as a child; True when it exited 0."""
    try:
        return subprocess.run(list(argv), timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        print(f"label-loop: the pass ran over {timeout:.0f}s and was killed", file=sys.stderr, flush=True)
        return False
    except OSError as e:
        print(f"label-loop: cannot run {argv[0]}: {e}", file=sys.stderr, flush=True)
        return False


def loop(one_pass: Callable[[], bool], stop: threading.Event, interval: float, retry: float) -> int:
    """Passes until ``stop``; the number of passes run."""
    passes = 0
    while not stop.is_set():
        ok = one_pass()
        passes += 1
        stop.wait(interval if ok else retry)
    return passes


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="label-loop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--interval", type=float, default=600.0, help="seconds between passes (600)")
    ap.add_argument("--retry", type=float, default=30.0, help="seconds before retrying a failed pass (30)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- the pass's command")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the pass's command after --")
    if args.interval <= 0 or args.retry <= 0:
        ap.error("--interval and --retry must be positive")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    started = time.monotonic()
    passes = loop(lambda: run_pass(command), stop, args.interval, args.retry)
    print(f"label-loop: stopped after {passes} passes in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
