"""critest (cri-tools' CRI validation suite) against containerd and against edgevirt-cri in front of
that same containerd (a private one), in one run: the shim must pass every spec containerd passes.
deploy/cri/run_critest.py does the work; the images critest pulls are built from busybox and pushed
to the local registry first. Skipped spec: the one pulling an image by an upstream digest, which
cannot exist offline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy" / "cri"))

import run_critest  # noqa: E402

pytestmark = [pytest.mark.root, pytest.mark.cluster, pytest.mark.timeout(1800)]


def test_the_shim_passes_every_critest_spec_containerd_passes(cluster, tmp_path):
    ref, ours, worse = run_critest.compare(None, run_critest.DEFAULT_SKIP, tmp_path / "critest")
    assert sum(1 for v in ref.values() if v == "passed") > 50, f"containerd passed too little: {ref}"
    assert not worse, "edgevirt-cri fails specs containerd passes:\n" + "\n".join(worse)
    # Nothing the shim passes is counted twice or lost: both ran the same specs.
    assert set(ref) == set(ours)
