#!/usr/bin/env python3
"""Build the edgevirt wheel (with its CRI stubs generated at build time), cached by its inputs.

The wheel's inputs (pyproject.toml, setup.py, README.md, deploy/versions.env and the four packages,
as the working tree has them: tracked and untracked-not-ignored files) are copied into a scratch
directory and built there with `pip wheel --no-deps` (build isolation installs the pinned
`[build-system] requires`), so nothing is written into the checkout. The wheel lands in
~/.cache/edgevirt/wheel/<key>/, where <key> hashes those inputs and SOURCE_DATE_EPOCH (default: the
time of the last commit that touched them), so a second build with the same inputs is a lookup and
two builds of the same inputs give byte-identical wheels.

API:    from edgevirt_wheel import build_wheel; path = build_wheel(repo)
CLI:    python3 deploy/images/edgevirt_wheel.py [--repo DIR] [--cache-dir DIR] [--no-cache]
        (prints the wheel's path)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("EDGEVIRT_CACHE", Path.home() / ".cache" / "edgevirt")) / "wheel"
# What goes into the wheel, or decides how it is built.
INPUTS = ("pyproject.toml", "setup.py", "README.md", "deploy/versions.env")
PACKAGES = ("cni_macvtap", "cri_shim", "vmcrd", "runtimeclass")


def say(msg: str) -> None:
    print(f"[wheel] {msg}", file=sys.stderr, flush=True)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def input_files(repo: Path) -> list[str]:
    """The wheel's input files, relative, sorted: tracked or untracked-not-ignored, present on disk."""
    out = _git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *INPUTS, *PACKAGES)
    return sorted({p for p in out.split("\0") if p and (repo / p).is_file() and not (repo / p).is_symlink()})


def source_date_epoch(repo: Path, paths: list[str] | tuple[str, ...]) -> int:
    """$SOURCE_DATE_EPOCH, else the commit time of the last commit that touched `paths`."""
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        return int(env)
    out = _git(repo, "log", "-1", "--format=%ct", "--", *paths).strip()
    return int(out) if out else 315532800  # 1980-01-01, the earliest time a zip entry can carry


def inputs_key(repo: Path, files: list[str], epoch: int) -> str:
    """sha256 over each input's path, executable bit and content, and the epoch."""
    h = hashlib.sha256(f"epoch={epoch}\n".encode())
    for rel in files:
        p = repo / rel
        h.update(f"{rel}\0{os.stat(p).st_mode & 0o111:o}\0".encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:20]


def build_wheel(repo: Path = REPO, cache: Path = CACHE, use_cache: bool = True) -> Path:
    """The wheel of `repo`'s working tree (built or found in the cache)."""
    files = input_files(repo)
    if "pyproject.toml" not in files:
        raise SystemExit(f"edgevirt_wheel: {repo} has no pyproject.toml: pass --repo <checkout>")
    epoch = source_date_epoch(repo, [*INPUTS, *PACKAGES])
    key = inputs_key(repo, files, epoch)
    out = cache / key
    found = sorted(out.glob("edgevirt-*.whl")) if out.is_dir() else []
    if use_cache and len(found) == 1:
        say(f"cached: {found[0]} (inputs {key})")
        return found[0]
    say(f"building from {len(files)} input files (inputs {key}, SOURCE_DATE_EPOCH={epoch})")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgevirt-wheel-") as tmp:
        src, dist = Path(tmp) / "src", Path(tmp) / "dist"
        for rel in files:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / rel, src / rel)
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "PYTHONHASHSEED": "0"}
        env["PATH"] = f"{env.get('PATH', '/usr/bin:/bin')}:/usr/local/go/bin"  # find_proto's fallback
        old_umask = os.umask(0o022)  # the files' modes go into the wheel
        try:
            cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check"]
            r = subprocess.run(
                [*cmd, "-q", "-w", str(dist), str(src)], env=env, capture_output=True, text=True
            )
        finally:
            os.umask(old_umask)
        if r.returncode != 0:
            raise SystemExit(f"edgevirt_wheel: pip wheel failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        wheels = sorted(dist.glob("edgevirt-*.whl"))
        if len(wheels) != 1:
            raise SystemExit(f"edgevirt_wheel: expected one wheel in {dist}, got {wheels}")
        staged = cache / f".{key}.tmp-{os.getpid()}"
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir()
        shutil.copy2(wheels[0], staged / wheels[0].name)
        shutil.rmtree(out, ignore_errors=True)
        staged.rename(out)
    wheel = out / wheels[0].name
    say(f"built {wheel} ({wheel.stat().st_size // 1024} KiB)")
    return wheel


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout to build (default: this one)")
    ap.add_argument("--cache-dir", type=Path, default=CACHE, help=f"where wheels are kept (default {CACHE})")
    ap.add_argument("--no-cache", action="store_true", help="build even when a wheel of these inputs exists")
    args = ap.parse_args(argv)
    print(build_wheel(args.repo.resolve(), args.cache_dir, use_cache=not args.no_cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
