"""The daemon-only macvtap CNI client of the edgevirt image: deploy/cni/macvtap-client.c, static.

The edgevirt-node DaemonSet's init container copies this binary into the host's CNI bin dir, as
flannel and calico install theirs: it must run on any host, so it is linked statically and depends
on no path of the image (no Python, no launcher). Built with ``-DMACVTAP_DAEMON_ONLY``: every call
goes to the macvtap daemon of the DaemonSet, and when that cannot answer the plugin fails with CNI
error 11 (try again later) naming the socket, so the runtime retries.

The default socket, limits and wire constants come from the header ``cni_macvtap.cheader`` renders
from the checkout (one definition, as deploy/cni/install-plugin does). The same inputs and compiler
give the same bytes (no timestamps; stripped).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = "deploy/cni/macvtap-client.c"
#: where the image holds it (the init container's --source)
IMAGE_PATH = "usr/local/lib/edgevirt/cni/macvtap"
FLAGS = ["-O2", "-Wall", "-Werror", "-static", "-s", "-DMACVTAP_DAEMON_ONLY"]


class BuildError(RuntimeError):
    """The client could not be compiled; the message says what is missing."""


def compiler() -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BuildError("no C compiler for the static macvtap client: apt-get install gcc libc6-dev")
    return cc


def compiler_version(cc: str | None = None) -> str:
    """What the binary depends on besides the sources (part of the layer's cache key)."""
    out = subprocess.run([cc or compiler(), "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0] if out.stdout else ""


def render_header(repo: Path) -> str:
    """cni_macvtap.cheader's header, rendered from ``repo``'s package (standard library only)."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from cni_macvtap.cheader import render; print(render(), end='')"
    )
    out = subprocess.run([sys.executable, "-IS", "-c", code, str(repo)], capture_output=True, text=True)
    if out.returncode != 0:
        raise BuildError(f"cni_macvtap.cheader failed: {out.stderr.strip()[-1000:]}")
    return out.stdout


def build(repo: Path, out_dir: Path) -> Path:
    """Compile the daemon-only static client of ``repo`` into ``out_dir`` as ``macvtap-<sha256[:16]>``
    (mode 0755; content-addressed, so builds of two checkouts never overwrite each other's)."""
    cc = compiler()
    with tempfile.TemporaryDirectory(prefix="edgevirt-macvtap-") as tmp:
        header = Path(tmp, "macvtap-defaults.h")
        header.write_text(render_header(repo))
        binary = Path(tmp, "macvtap")
        argv = [cc, *FLAGS, "-include", str(header), "-o", str(binary), str(repo / SOURCE)]
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            hint = " (static linking needs libc6-dev's libc.a)" if "-lc" in r.stderr else ""
            raise BuildError(f"{' '.join(argv)} failed{hint}:\n{r.stderr.strip()[-2000:]}")
        data = binary.read_bytes()
    out = out_dir / f"macvtap-{hashlib.sha256(data).hexdigest()[:16]}"
    if not out.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        tmp.write_bytes(data)
        tmp.chmod(0o755)
        tmp.replace(out)
    return out
