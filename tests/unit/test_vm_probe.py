"""The node probe without running guests: labels, payloads, cache keying, kata detection."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from runtimeclass import guests, kata
from runtimeclass import probe as P


def result(kvm_ok: bool, kata_ok: bool = False) -> P.ProbeResult:
    return P.ProbeResult(
        kvm=P.Check(kvm_ok, "k"),
        tcg=P.Check(True, "t"),
        kata=P.Check(kata_ok, "a"),
        libvirt=P.Check(True, "l"),
        key={"boot_id": "b"},
    )


def test_labels_and_domain_type():
    assert result(False).labels() == {
        "edgevirt.io/kvm": "false",
        "edgevirt.io/accel": "tcg",
        "edgevirt.io/kata": "false",
    }
    r = result(True, True)
    assert r.labels() == {"edgevirt.io/kvm": "true", "edgevirt.io/accel": "kvm", "edgevirt.io/kata": "true"}
    assert (r.accel, r.domain_type, result(False).domain_type) == ("kvm", "kvm", "qemu")
    assert P.ProbeResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_boot_sector_payload():
    bs = guests.boot_sector()
    assert len(bs) == 512 and bs[-2:] == b"\x55\xaa"
    assert bs[:4] == bytes([0xB0, 0x31, 0xE6, 0xF4])  # mov al,0x31 ; out 0xf4,al -> exit (0x31<<1)|1 = 99


@pytest.mark.skipif(shutil.which("cpio") is None, reason="needs cpio to read the archive back")
def test_probe_initramfs_is_valid_newc(tmp_path):
    bb = tmp_path / "busybox"
    bb.write_bytes(b"\x7fELF fake")
    archive = guests.probe_initramfs(str(bb))
    listing = subprocess.run(
        ["cpio", "-it"], input=archive, capture_output=True, check=True, timeout=60
    ).stdout.decode()
    assert listing.split() == ["bin", "dev", "bin/busybox", "bin/sh", "bin/poweroff", "init"]
    out = subprocess.run(
        ["cpio", "-i", "--to-stdout", "init"], input=archive, capture_output=True, check=True, timeout=60
    ).stdout.decode()
    assert guests.PROBE_MARKER in out and "poweroff -f" in out


def test_probe_uses_file_cache_keyed_by_boot(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(P, "_PROCESS_CACHE", {})
    monkeypatch.setattr(P, "check_kvm", lambda k, t: calls.append("kvm") or P.Check(False, "hangs"))
    monkeypatch.setattr(P, "check_tcg", lambda: P.Check(True, "ok"))
    monkeypatch.setattr(P, "check_libvirt", lambda uri: P.Check(True, "up"))
    cache = tmp_path / "probe.json"
    r1 = P.probe(kernel="/k", cache_file=cache)
    assert calls == ["kvm"] and r1.labels()["edgevirt.io/accel"] == "tcg"
    assert json.loads(cache.read_text())["key"]["boot_id"] == r1.key["boot_id"]
    P.probe(kernel="/k", cache_file=cache)  # process cache
    monkeypatch.setattr(P, "_PROCESS_CACHE", {})
    P.probe(kernel="/k", cache_file=cache)  # file cache
    assert calls == ["kvm"]
    data = json.loads(cache.read_text())
    data["key"]["boot_id"] = "another-boot"
    cache.write_text(json.dumps(data))
    monkeypatch.setattr(P, "_PROCESS_CACHE", {})
    P.probe(kernel="/k", cache_file=cache)  # different boot: probe again
    assert calls == ["kvm", "kvm"]
    P.probe(kernel="/k", cache_file=cache, refresh=True)
    assert calls == ["kvm", "kvm", "kvm"]


def test_kata_detection(tmp_path, monkeypatch):
    monkeypatch.setattr(kata, "KATA_BIN_DIRS", (str(tmp_path / "bin"),))
    monkeypatch.setattr(kata, "KATA_CONFIGS", (str(tmp_path / "configuration.toml"),))
    monkeypatch.setenv("PATH", "/nonexistent")
    assert "not found" in kata.check_kata(True).reason
    (tmp_path / "bin").mkdir()
    shim = tmp_path / "bin" / kata.KATA_SHIM
    shim.write_text("#!/bin/sh\n")
    shim.chmod(0o755)
    assert not kata.check_kata(True).ok and "configuration.toml" in kata.check_kata(True).reason
    (tmp_path / "configuration.toml").write_text("[hypervisor.qemu]\n")
    assert kata.check_kata(True).ok
    no_kvm = kata.check_kata(False)
    assert not no_kvm.ok and "KVM does not run guests" in no_kvm.reason


def test_kvm_check_reports_missing_device(monkeypatch):
    r = guests.check_kvm_ioctl(dev="/nonexistent/kvm")
    assert not r.ok and "does not exist" in r.reason
    assert "no guest kernel" in guests.check_qemu_kernel_boot("kvm", None, 1).reason


def test_cache_file_is_read_only_for_its_key_and_garbage_is_ignored(tmp_path):
    cache = tmp_path / "sub" / "probe.json"
    assert P.read_cache(cache, {"boot_id": "b"}) is None  # absent
    P.write_cache(cache, result(True))
    assert P.read_cache(cache, {"boot_id": "b"}) == result(True)
    assert P.read_cache(cache, {"boot_id": "other"}) is None
    assert not list(cache.parent.glob("*.tmp"))  # renamed into place
    cache.write_text('{"key": {"boot_id": "b"}, "kvm": ')  # torn
    assert P.read_cache(cache, {"boot_id": "b"}) is None
