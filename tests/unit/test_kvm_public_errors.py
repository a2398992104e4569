"""The net under the error texts: paths under the node's private folders and sha256 digests never
reach a CRI client; paths the user wrote (hostDisk root, file:// images) and container IDs stay."""

from __future__ import annotations

import grpc
import pytest

from cri_shim.kvm.contract import ContractError
from cri_shim.kvm.public_errors import Redactor, vm_error
from cri_shim.vm.errors import DomainNotFound, ImageError, ValidationError, VMError

HEX = "ab" * 32


@pytest.mark.parametrize(
    ("text", "public"),
    [
        (
            f"Could not open '/var/lib/edgevirt/vm/images/blobs/sha256/{HEX}': denied",
            "Could not open '<node path>': denied",
        ),
        ("open /var/lib/kubelet/pods/u/volumes/x/userdata failed", "open <node path> failed"),
        ("no /var/lib/edgevirt/vm", "no <node path>"),
        (f"digest sha256:{HEX} and #sha256={HEX}", "digest sha256:<digest> and #sha256=<digest>"),
        (
            "hostDisk /var/lib/edgevirt/hostdisks/team-a/x.img is missing",
            "hostDisk /var/lib/edgevirt/hostdisks/team-a/x.img is missing",
        ),
        (
            "file:///var/lib/edgevirt/images/a.qcow2 is not a file",
            "file:///var/lib/edgevirt/images/a.qcow2 is not a file",
        ),
        ("/var/lib/edgevirt/vmother stays", "/var/lib/edgevirt/vmother stays"),
        (f"container {HEX} not found", f"container {HEX} not found"),
    ],
)
def test_private_paths_and_digests_are_removed(text, public):
    assert Redactor(["/var/lib/edgevirt/vm", "/var/lib/kubelet/", "/"])(text) == public


def test_vm_errors_map_to_codes_and_log_their_detail(caplog):
    cases = [
        (
            ContractError("edgevirt.io/volumes", "not JSON", "fix it"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "config.annotations: ",
        ),
        (
            ValidationError("image", "bad", "fix", detail="/secret/path"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "image: bad; fix",
        ),
        (ImageError("cannot fetch"), grpc.StatusCode.INVALID_ARGUMENT, "cannot fetch"),
        (DomainNotFound("gone"), grpc.StatusCode.NOT_FOUND, "gone"),
        (VMError("libvirt down"), grpc.StatusCode.UNKNOWN, "libvirt down"),
    ]
    for err, code, start in cases:
        be = vm_error(err)
        assert be.code == code and be.message.startswith(start) and "/secret/path" not in be.message
    assert "/secret/path" in caplog.text
