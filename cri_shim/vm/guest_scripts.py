"""The POSIX shell scripts edgevirt runs in a guest through its agent (``guest-exec``), as argv.

Each script is passed whole to ``sh -c`` with its parameters as positional arguments (never pasted
into the script text), so a command's words reach the guest unchanged and nothing needs quoting
except the one command line a TTY session hands to ``script -c`` (:func:`tty_command`).

* :func:`bounded_exec` (ExecSync, exec probes): the command's stdout and stderr each go through
  ``head -c N; cat >/dev/null`` (at most N bytes kept, the rest read and dropped so the command
  never sees a broken pipe) while its real exit code comes back through a third descriptor: the
  agent's reply stays far below libvirt's 10 MiB cap, whatever the command writes.
* :func:`kill_tree` (a timed-out exec, an abandoned session): SIGSTOP a process so it cannot fork,
  do the same to its children (found by ``PPid`` in /proc), then SIGKILL them bottom-up. It refuses
  any pid below 2. It only ever runs inside a guest.
* :func:`session` (streaming exec, port-forward): find the session's hot-plugged virtio-serial
  ports by name in /sys/class/virtio-ports (``<prefix>.in``, ``.out``, ``.err``, ``.resize``),
  write one sync byte on each port the host writes to (the host sends nothing before it: bytes
  reaching a port the guest has not opened are dropped; the write also waits until the host is
  connected, so the guest never reads a premature end of file), run the command on them (under
  util-linux ``script`` for a TTY), then write the session's end marker on the output ports (the
  host end of a virtio-serial port never sees an end of file) and exit with the command's code.
  A TTY session's resize port carries ``"<rows> <cols>\\n"`` lines, applied with ``stty``.

Guest requirements: ``sh``, ``head``, ``cat``, ``kill``, ``grep`` (busybox has them all); for a TTY
util-linux's ``script``; for port-forward ``nc``.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

#: exit code of :func:`session` when the session could not be set up in the guest (its reason on
#: the wrapper's own stderr, which the agent captures)
SETUP_FAILED = 125
#: exit code of a TTY session in a guest without ``script``
NO_SCRIPT = 126

BOUNDED_EXEC = r"""n=$1; shift
bound() { head -c "$n"; cat >/dev/null; }
exec 4>&1
rc=$( { { { "$@" 4>&- 5>&-; echo $? >&5; } 2>&1 1>&3 3>&- | bound >&2 4>&- 5>&-; } 3>&1 |
  bound >&4 4>&- 5>&-; } 5>&1 )
exit "${rc:-1}"
"""

KILL_TREE = r"""k() {
  [ "$1" -gt 1 ] 2>/dev/null || return 0
  kill -STOP "$1" 2>/dev/null
  for s in $(grep -l "^PPid:[[:space:]]*$1\$" /proc/[0-9]*/status 2>/dev/null); do
    c=${s#/proc/}; k "${c%/status}"
  done
  kill -KILL "$1" 2>/dev/null
  return 0
}
k "$1"
"""

SESSION = r"""prefix=$1 marker=$2 flags=$3 ttycmd=$4; shift 4
has() { case "$flags" in *"$1"*) return 0;; esac; return 1; }
port() {
  i=0
  while [ "$i" -lt 200 ]; do
    for p in /sys/class/virtio-ports/*; do
      if [ "$(cat "$p/name" 2>/dev/null)" = "$prefix.$1" ] && [ -c "/dev/${p##*/}" ]; then
        echo "/dev/${p##*/}"; return 0
      fi
    done
    sleep 0.05 2>/dev/null || sleep 1
    i=$((i + 1))
  done
  echo "edgevirt: the virtio-serial port $prefix.$1 did not show up in the guest" >&2
  return 1
}
out=$(port out) && exec 3>"$out" || exit 125
if has e; then err=$(port err) && exec 7>"$err" || exit 125
elif has c; then exec 7>&2
else exec 7>/dev/null; fi
if has i; then in=$(port in) && exec 6<>"$in" || exit 125; printf . >&6 || exit 125
else exec 6</dev/null; fi
if has r; then rs=$(port resize) && exec 8<>"$rs" || exit 125; printf . >&8 || exit 125; fi
if has t; then
  if command -v script >/dev/null 2>&1; then
    script -qec "$ttycmd" /dev/null <&6 >&3 2>&3 3>&- 6>&- 7>&-
    rc=$?
  else
    echo "edgevirt: a TTY (kubectl exec -t) needs util-linux's script in the guest" >&3
    rc=126
  fi
else
  "$@" <&6 >&3 2>&7 3>&- 6>&- 7>&- 8>&-
  rc=$?
fi
printf '%s' "$marker" >&3
has e && printf '%s' "$marker" >&7
exit "$rc"
"""


def bounded_exec(argv: Sequence[str], limit: int) -> tuple[str, list[str]]:
    """(path, args) for guest-exec: ``argv`` with stdout and stderr each cut at ``limit`` bytes."""
    return "sh", ["-c", BOUNDED_EXEC, "edgevirt-exec", str(limit), *argv]


def kill_tree(pid: int) -> tuple[str, list[str]]:
    """(path, args) for guest-exec: kill process ``pid`` and everything it started."""
    if pid < 2:
        raise ValueError(f"refusing to kill pid {pid} in the guest")
    return "sh", ["-c", KILL_TREE, "edgevirt-kill", str(pid)]


def tty_command(argv: Sequence[str], rows: int, cols: int, resize: bool) -> str:
    """The command line ``script -c`` runs for a TTY session: set the first window size, apply
    later ones from the resize port (fd 8) in the background, then exec ``argv``."""
    parts = []
    if rows > 0 and cols > 0:
        parts.append(f"stty rows {rows} cols {cols} 2>/dev/null")
    if resize:
        parts.append(
            '(while read -r h w <&8; do stty rows "$h" cols "$w" </dev/tty 2>/dev/null; done) & exec 8<&-'
        )
    parts.append("exec " + " ".join(shlex.quote(a) for a in argv))
    return "; ".join(parts)


def session(
    prefix: str,
    marker: str,
    argv: Sequence[str],
    *,
    stdin: bool,
    stderr: str,
    tty: bool,
    rows: int = 0,
    cols: int = 0,
) -> tuple[str, list[str]]:
    """(path, args) for guest-exec of a streaming session on the ports named ``<prefix>.*``.
    ``stderr``: ``port`` (its own port), ``captured`` (the agent captures it) or ``none``; with a
    TTY it is the terminal's (stdout)."""
    flags = "o"
    flags += "i" if stdin else ""
    flags += "tr" if tty else {"port": "e", "captured": "c", "none": ""}[stderr]
    ttycmd = tty_command(argv, rows, cols, resize=True) if tty else ""
    return "sh", ["-c", SESSION, "edgevirt-session", prefix, marker, flags, ttycmd, *argv]
