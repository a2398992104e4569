"""Builds the images critest (cri-tools) pulls, from Debian's busybox-static and two tiny C programs,
and pushes them to the local registry under their upstream names (containerd mirrors
registry.k8s.io and gcr.io to 127.0.0.1:5000/<path>), so critest's pulls are real pulls offline.

Built (all with PATH set, /etc/passwd + /etc/group with www-data, user1000 in group 50000, a /bin/ls
that is its own file so masking it does not mask the shell, /bin/pgrep and /bin/ipcs scripts):
- registry.k8s.io/e2e-test-images/busybox:1.29-2 (critest's default image)
- e2e-test-images/nginx:1.14-2, gcr.io/k8s-staging-cri-tools/hostnet-nginx-amd64: a C "nginx" that
  writes /var/run/nginx.pid, shows "nginx: master process" and runs busybox httpd (:80 / :12003)
- e2e-test-images/httpd:2.4.39-4: busybox httpd on :80, says "httpd" on stdout
- e2e-test-images/nonewprivs:1.3: a setuid-root C program printing "Effective uid: N"
- registry.k8s.io/pause:3.9 (and k8s.gcr.io/pause:3.9 through the same mirror): a busybox image
- gcr.io/k8s-staging-cri-tools/test-image-*: tags, three distinct images, USER variants
Not buildable: test-image-digest@sha256:9700f9a2... (names a digest of upstream bytes).

Usage: python deploy/cri/critest_images.py [--force]   (an image already in the registry is kept)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy" / "local"))

from localcluster import images  # noqa: E402

E2E = "e2e-test-images"
STAGING = "k8s-staging-cri-tools"
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "www-data:x:33:33:www-data:/var/www:/bin/false\n"
    "user1000:x:1000:1000::/home:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/:/bin/false\n"
)
GROUP = "root:x:0:\nwww-data:x:33:\nuser1000:x:1000:\ngroup50000:x:50000:user1000\nnogroup:x:65534:\n"
PGREP = """#!/bin/sh
# pgrep NAME: pids whose command name is NAME (busybox-static has no pgrep applet).
rc=1
for d in /proc/[0-9]*; do
  [ "$(cat "$d/comm" 2>/dev/null)" = "$1" ] && { echo "${d#/proc/}"; rc=0; }
done
exit $rc
"""
IPCS = """#!/bin/sh
# ipcs -m: the System V shared memory segments of this IPC namespace (no ipcs applet in busybox).
[ "$1" = "-m" ] || { echo "usage: ipcs -m" >&2; exit 1; }
echo "------ Shared Memory Segments --------"
echo "key shmid perms bytes nattch"
awk 'NR > 1 {print $1, $2, $3, $4, $7}' /proc/sysvipc/shm
"""
NGINX_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
/* Stand-in for nginx in critest: pid file, "master process" title, busybox httpd as the worker. */
int main(int argc, char **argv) {
    const char *port = getenv("NGINX_PORT") ? getenv("NGINX_PORT") : "80";
    if (argc < 2 || strcmp(argv[1], "master") != 0) {
        char *args[] = {"nginx: master process nginx", "master", NULL};
        execv("/usr/sbin/nginx", args);
        return 127;
    }
    FILE *f = fopen("/var/run/nginx.pid", "w");
    if (f) { fprintf(f, "%d\n", getpid()); fclose(f); }
    pid_t child = fork();
    if (child == 0) {
        execl("/bin/httpd", "httpd", "-f", "-p", port, "-h", "/www", (char *)NULL);
        _exit(127);
    }
    int status = 0;
    waitpid(child, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
"""
NONEWPRIVS_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) { printf("Effective uid: %d\n", geteuid()); return 0; }
"""


def _compile(source: str, out: Path) -> None:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "prog.c"
        src.write_text(source)
        subprocess.run(["gcc", "-static", "-Os", "-o", str(out), str(src)], check=True, capture_output=True)


def _rootfs(root: Path, extra: str | None) -> None:
    images._busybox_rootfs(root)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    # critest's MaskedPaths test masks /bin/ls: it must not be a link to the shell's binary.
    (root / "bin" / "ls").unlink()
    shutil.copy2(images.BUSYBOX, root / "bin" / "ls")
    (root / "bin" / "pgrep").write_text(PGREP)
    (root / "bin" / "pgrep").chmod(0o755)
    (root / "bin" / "ipcs").write_text(IPCS)
    (root / "bin" / "ipcs").chmod(0o755)
    (root / "var" / "run").mkdir(parents=True, exist_ok=True)
    if extra in ("web", "nginx"):
        (root / "www").mkdir()
        (root / "www" / "index.html").write_text("<html><body>edgevirt critest web server</body></html>\n")
    if extra == "nginx":
        (root / "usr" / "sbin").mkdir(parents=True)
        _compile(NGINX_C, root / "usr" / "sbin" / "nginx")
    if extra == "nonewprivs":
        (root / "usr" / "local" / "bin").mkdir(parents=True)
        prog = root / "usr" / "local" / "bin" / "nnp"
        _compile(NONEWPRIVS_C, prog)
        os.chown(prog, 0, 0)
        prog.chmod(0o4755)


def _nginx(port: int) -> list[str]:
    return [
        "--config.env",
        f"NGINX_PORT={port}",
        "--config.entrypoint",
        "/usr/sbin/nginx",
        "--config.exposedports",
        f"{port}/tcp",
    ]


HTTPD = "echo httpd: serving /www on :80 && exec httpd -f -p 80 -h /www"
SH = ["--config.cmd", "sh"]

# repo -> (tags, umoci config args, extra rootfs content)
IMAGES: dict[str, tuple[list[str], list[str], str | None]] = {
    f"{E2E}/busybox": (["1.29-2"], SH, None),
    f"{E2E}/nginx": (["1.14-2"], _nginx(80), "nginx"),
    f"{E2E}/httpd": (
        ["2.4.39-4"],
        ["--config.entrypoint", "sh", "--config.entrypoint", "-c", "--config.entrypoint", HTTPD],
        "web",
    ),
    f"{E2E}/nonewprivs": (["1.3"], ["--config.entrypoint", "/usr/local/bin/nnp"], "nonewprivs"),
    f"{STAGING}/hostnet-nginx-amd64": (["latest"], _nginx(12003), "nginx"),
    # A pause image of its own (not the cluster's pause:3.10: critest counts the tags of this one).
    "pause": (["3.9"], [*SH, "--config.label", "edgevirt.test=pause-3.9"], None),
    f"{STAGING}/test-image-latest": (["latest"], SH, None),
    f"{STAGING}/test-image-tag": (["test", "all"], SH, None),
    f"{STAGING}/test-image-tags": (["1", "2", "3"], SH, None),
    f"{STAGING}/test-image-1": (["latest"], [*SH, "--config.label", "edgevirt.test=1"], None),
    f"{STAGING}/test-image-2": (["latest"], [*SH, "--config.label", "edgevirt.test=2"], None),
    f"{STAGING}/test-image-3": (["latest"], [*SH, "--config.label", "edgevirt.test=3"], None),
    f"{STAGING}/test-image-user-uid": (["latest"], [*SH, "--config.user", "1002"], None),
    f"{STAGING}/test-image-user-username": (["latest"], [*SH, "--config.user", "www-data"], None),
    f"{STAGING}/test-image-user-uid-group": (["latest"], [*SH, "--config.user", "1003:1003"], None),
    f"{STAGING}/test-image-user-username-group": (
        ["latest"],
        [*SH, "--config.user", "www-data:www-data"],
        None,
    ),
    f"{STAGING}/test-image-predefined-group": (["latest"], [*SH, "--config.user", "1000"], None),
}
PATH_ENV = ["--config.env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]


def ensure(force: bool = False) -> list[str]:
    """Build and push what is missing (everything with force); returns the repos pushed."""
    pushed = []
    for repo, (tags, config, extra) in IMAGES.items():
        if not force and all(images.in_registry(repo, t) for t in tags):
            continue
        with tempfile.TemporaryDirectory(prefix="critest-img-") as d:
            root, layout = Path(d) / "rootfs", Path(d) / "layout"
            _rootfs(root, extra)
            images.build_oci(root, layout, "img", PATH_ENV + config)
            images.push(layout, "img", repo, tags)
        print(f"[critest-images] pushed {repo}:{','.join(tags)}", flush=True)
        pushed.append(repo)
    return pushed


if __name__ == "__main__":
    ensure(force="--force" in sys.argv)
    print("[critest-images] all critest images are in the local registry")
