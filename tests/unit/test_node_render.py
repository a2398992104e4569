"""What edgevirt-node writes, as text: edgevirt-cri's config (read back by the shim's own parser),
the systemd units and drop-ins, kubelet's KubeletConfiguration drop-in, ExecStart quoting, and the
marked libvirt block (placement, removal, later edits kept). Pure functions, no files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from cri_shim import config as cri_config
from cri_shim.node import cli, qemu_conf, units
from cri_shim.node import cri_config as node_config
from cri_shim.node.options import NodeOptions
from cri_shim.node.plan import plan

pytestmark = pytest.mark.timeout(120)

OPTS = NodeOptions(
    cri_binary=Path("/usr/local/bin/edgevirt-cri"), macvtap_binary=Path("/usr/local/bin/macvtap")
)


def parsed(opts: NodeOptions) -> cri_config.Config:
    return cri_config.parse(yaml.safe_load(node_config.render(opts)), "test")


def test_the_config_routes_containerd_handlers_and_kvm():
    cfg = parsed(OPTS)
    assert cfg.socket == "/run/edgevirt/cri.sock" and cfg.socket_mode == 0o660
    assert cfg.state_dir == "/var/lib/edgevirt/cri"
    assert cfg.handlers == {"": "containerd", "runc": "containerd", "kata": "containerd", "kvm": "kvm"}
    assert cfg.backends["containerd"].socket == "/run/containerd/containerd.sock"
    kvm = cfg.backends["kvm"]
    assert kvm.factory == "cri_shim.kvm:create"
    assert kvm.options == {
        "state_dir": "/var/lib/edgevirt/cri-kvm",
        "vm_state_dir": "/var/lib/edgevirt/vm",
        "cni_conflist": "/etc/edgevirt/cni-vm/10-edgevirt-vm.conflist",
        "cni_bin_dirs": ["/opt/cni/bin", "/usr/lib/cni"],
        "libvirt_uri": "qemu:///system",
        "image_roots": ["/var/lib/edgevirt/images"],
        "containerd_socket": "/run/containerd/containerd.sock",
        "containerd_root": "/var/lib/containerd",
        "insecure_registries": [],
    }


def test_optional_kvm_options_only_when_given_and_no_kvm_without_it():
    opts = NodeOptions(
        host_disk_root=Path("/srv/disks"),
        kubelet_root_dir=Path("/var/lib/kubelet2"),
        kvm_options=(("max_volumes", 16), ("domain_type", "qemu")),
        insecure_registries=("127.0.0.1:5000",),
    )
    options = parsed(opts).backends["kvm"].options
    assert options["host_disk_root"] == "/srv/disks" and options["kubelet_root_dir"] == "/var/lib/kubelet2"
    assert options["max_volumes"] == 16 and options["domain_type"] == "qemu"
    assert options["insecure_registries"] == ["127.0.0.1:5000"]
    cfg = parsed(NodeOptions(kvm=False, containerd_socket=Path("/run/k3s/containerd.sock")))
    assert set(cfg.backends) == {"containerd"} and "kvm" not in cfg.handlers
    assert cfg.backends["containerd"].socket == "/run/k3s/containerd.sock"


def test_the_config_survives_odd_paths():
    odd = NodeOptions(state_dir=Path("/var/lib/edge virt/#state: 'x'"), socket=Path('/run/a "b"/cri.sock'))
    cfg = parsed(odd)
    assert cfg.state_dir == "/var/lib/edge virt/#state: 'x'" and cfg.socket == '/run/a "b"/cri.sock'


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=12), min_size=1))
def test_exec_start_quoting_round_trips(argv):
    unit = f"[Service]\nExecStart={units.exec_line(argv)}\n"
    assert units.exec_start(unit) == argv


def test_exec_start_escapes_specifiers_and_variables():
    line = units.exec_line(["/bin/x", "--a=50%", "$HOME", "two words", 'q"uote'])
    assert line == '/bin/x "--a=50%%" "$$HOME" "two words" "q\\"uote"'


def test_the_cri_unit():
    text = units.cri_unit(OPTS)
    lines = text.splitlines()
    for expected in (
        "Type=notify",
        "NotifyAccess=main",
        "Restart=on-failure",
        "KillMode=mixed",
        "Before=kubelet.service",
        "WantedBy=multi-user.target",
        "NoNewPrivileges=yes",
    ):
        assert expected in lines, expected
    after = next(line for line in lines if line.startswith("After="))
    for unit in ("containerd.service", "libvirtd.service", "edgevirt-macvtap.service"):
        assert unit in after
    assert units.exec_start(text) == [
        "/usr/local/bin/edgevirt-cri",
        "--config=/etc/edgevirt/cri.yaml",
        "--ops-address=127.0.0.1:9641",
        "--log-level=info",
        "--log-format=json",
    ]
    # Nothing that gives the service a mount namespace, hides devices or forbids namespaces.
    for forbidden in (
        "ProtectSystem",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernel",
        "ProtectControlGroups",
        "ProtectClock",
        "DeviceAllow",
        "RestrictNamespaces",
        "MountFlags",
        "ReadOnlyPaths",
        "KillMode=control-group",
        "KillMode=process",
    ):
        assert not any(line.startswith(forbidden) for line in lines), forbidden


def test_without_the_macvtap_daemon_the_cri_unit_does_not_want_it():
    opts = NodeOptions(cri_binary=OPTS.cri_binary, macvtap_daemon=False)
    assert "edgevirt-macvtap" not in units.cri_unit(opts)
    kinds = {(w.kind, w.path.name) for w in plan(opts)}
    assert ("file", "edgevirt-macvtap.service") not in kinds and (
        "link",
        "edgevirt-macvtap.service",
    ) not in kinds


def test_the_macvtap_unit_and_the_empty_ops_address():
    opts = NodeOptions(macvtap_binary=Path("/opt/ev/bin/macvtap"), macvtap_ops_address="", log_format="text")
    text = units.macvtap_unit(opts)
    assert "Type=notify" in text.splitlines() and "Before=edgevirt-cri.service kubelet.service" in text
    assert units.exec_start(text) == [
        "/opt/ev/bin/macvtap",
        "daemon",
        "--socket=/run/edgevirt/macvtap.sock",
        "--ops-address=",
        "--log-level=info",
        "--log-format=text",
    ]


def test_kubelet_drop_ins():
    doc = yaml.safe_load(units.kubelet_config_dropin(NodeOptions(socket=Path("/run/x/cri.sock"))))
    assert doc == {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": "unix:///run/x/cri.sock",
        "imageServiceEndpoint": "unix:///run/x/cri.sock",
    }
    evented = NodeOptions(socket=Path("/run/x/cri.sock"), kubelet_evented_pleg=True)
    assert yaml.safe_load(units.kubelet_config_dropin(evented))["featureGates"] == {"EventedPLEG": True}
    args = cli.parser().parse_args(["install", "--kubelet-evented-pleg"])
    assert (
        cli.options(args).kubelet_evented_pleg
        and not cli.options(cli.parser().parse_args(["install"])).kubelet_evented_pleg
    )
    lines = units.kubelet_unit_dropin().splitlines()
    assert "Wants=edgevirt-cri.service" in lines and "After=edgevirt-cri.service" in lines
    assert not any(line.startswith("Requires=") for line in lines)  # a shim restart must not restart kubelet


def test_state_directories_are_private_and_vm_directories_traversable():
    modes = {str(w.path): w.mode for w in plan(OPTS) if w.kind == "dir"}
    assert modes == {
        "/var/lib/edgevirt/cri": 0o700,
        "/var/lib/edgevirt/cri-kvm": 0o700,
        "/var/lib/edgevirt/vm": 0o711,
        "/var/lib/edgevirt/images": 0o711,
    }


def test_the_libvirt_block_only_with_relaxed():
    assert not any(w.kind == "block" for w in plan(OPTS))
    relaxed = [w for w in plan(dataclasses.replace(OPTS, libvirt_relaxed=True)) if w.kind == "block"]
    assert [str(w.path) for w in relaxed] == ["/etc/libvirt/qemu.conf"]


ORIGINAL = (
    '# Master configuration file for the QEMU driver.\n#user = "libvirt-qemu"\nvnc_listen = "0.0.0.0"\n'
)


def test_the_block_goes_first_once_and_comes_out_exactly():
    text = qemu_conf.with_block(ORIGINAL)
    assert text.startswith(qemu_conf.BEGIN + "\n") and text.endswith(ORIGINAL)
    assert qemu_conf.with_block(text) == text
    assert qemu_conf.without_block(text) == ORIGINAL
    assert qemu_conf.without_block(ORIGINAL) == ORIGINAL
    for key, value in qemu_conf.SETTINGS.items():
        assert f"\n{key} = {value}\n" in text
    assert qemu_conf.with_block("") == qemu_conf.block() and qemu_conf.without_block(qemu_conf.block()) == ""


def test_later_edits_survive_the_block_coming_out():
    edited = qemu_conf.with_block(ORIGINAL) + "max_files = 4096\n"
    assert qemu_conf.without_block(edited) == ORIGINAL + "max_files = 4096\n"


def test_keys_the_block_overrides_are_reported():
    assert qemu_conf.overridden_keys(ORIGINAL) == []  # commented out
    assert qemu_conf.overridden_keys('user = "libvirt-qemu"\n  security_driver="apparmor"\n') == [
        "user",
        "security_driver",
    ]
    assert qemu_conf.overridden_keys(qemu_conf.with_block(ORIGINAL)) == []


def test_a_marker_inside_a_line_is_not_our_block():
    text = "x = 1 " + qemu_conf.BEGIN + "\n" + qemu_conf.END + "\n"
    assert qemu_conf.without_block(text) == text
