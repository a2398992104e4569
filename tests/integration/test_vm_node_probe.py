"""The node probe for real: QEMU TCG runs, a Linux guest boots under TCG (so the marker detection
works), and the KVM verdict plus the labels come from the same real run (on this PVM host: KVM
present, guests hang -> kvm=false, accel=tcg; on a real KVM host: kvm=true, accel=kvm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from runtimeclass import probe as P

pytestmark = [pytest.mark.timeout(180)]


def test_tcg_boot_sector_and_linux_guest():
    tcg = P.check_tcg()
    assert tcg.ok, tcg.reason
    kernel = P.find_kernel()
    if kernel is None:
        pytest.skip("no /boot/vmlinuz-*: apt-get install linux-image-amd64")
    boot = P.check_qemu_kernel_boot("tcg", kernel, timeout=90)
    assert boot.ok, boot.reason + "\n" + boot.details.get("tail", "")
    assert "booted" in boot.reason


def test_probe_cli_labels_follow_the_kvm_verdict(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtimeclass.probe",
            "--cache",
            str(tmp_path / "probe.json"),
            "--timeout",
            "15",
        ],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    kvm = res["kvm"]
    assert kvm["reason"]
    assert res["labels"]["edgevirt.io/kvm"] == ("true" if kvm["ok"] else "false")
    assert res["labels"]["edgevirt.io/accel"] == ("kvm" if kvm["ok"] else "tcg")
    assert res["domain_type"] == ("kvm" if kvm["ok"] else "qemu")
    assert res["tcg"]["ok"], res["tcg"]["reason"]
    if not os.path.exists("/dev/kvm"):
        assert not kvm["ok"] and "does not exist" in kvm["reason"]
    elif kvm["ok"]:
        assert "booted" in kvm["reason"]  # only a guest that reached userspace counts
    else:
        print("KVM verdict:", kvm["reason"])
    # the second run is answered from the per-boot cache file
    r2 = subprocess.run(
        [sys.executable, "-m", "runtimeclass.probe", "--cache", str(tmp_path / "probe.json"), "--labels"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert json.loads(r2.stdout) == res["labels"]
