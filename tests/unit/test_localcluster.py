"""Unit tests of the local cluster's building blocks: pid files, mount discovery, PKI, configs."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from localcluster import configs, health, leftovers, pki
from localcluster.paths import REPO, Paths
from localcluster.procs import Process, wait_for


def alive(pid: int) -> bool:
    """True if pid runs (a zombie awaiting its parent's wait() counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(state=tmp_path / "state", run=tmp_path / "run")


def test_process_start_recognise_and_stop(tmp_path: Path):
    proc = Process("sleeper", tmp_path / "p.pid", tmp_path / "p.log")
    assert not proc.running() and not proc.exited_early()
    pid = proc.start(["sh", "-c", "echo hello-log; sleep 60 & wait"])
    try:
        assert proc.pid() == pid
        wait_for("log line", lambda: "hello-log" in proc.logfile.read_text(), 5)
        # The child of the process is in its group and goes with it.
        children_file = Path(f"/proc/{pid}/task/{pid}/children")
        children = wait_for("the child", lambda: children_file.read_text().split(), 5)
        assert children
        assert proc.stop(grace=5)
        assert not alive(pid)
        for c in children:  # signalled with the group; gone as soon as the kernel reaps it
            wait_for(f"child {c} of the stopped process to end", lambda c=c: not alive(int(c)), 5)
        assert not proc.pidfile.exists()
    finally:
        proc.stop(grace=1)


def test_recycled_pid_is_not_ours(tmp_path: Path):
    """A pid file whose pid now belongs to another process (other start time) is not ours."""
    proc = Process("x", tmp_path / "x.pid", tmp_path / "x.log")
    proc.pidfile.write_text(json.dumps({"pid": os.getpid(), "start_time": 1, "argv": ["x"]}))
    assert proc.pid() is None
    assert proc.exited_early()
    assert not proc.stop()  # never signals a process that is not ours
    assert Path(f"/proc/{os.getpid()}").exists()


def test_crashed_process_is_reported_with_its_log(tmp_path: Path):
    proc = Process("crasher", tmp_path / "c.pid", tmp_path / "c.log")
    proc.start(["sh", "-c", "echo boom-reason >&2; exit 3"])
    with pytest.raises(RuntimeError, match="boom-reason"):
        wait_for("never", lambda: False, 10, proc)
    proc.stop()


def test_wait_for_times_out_with_what_it_waited_for():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="the moon"):
        wait_for("the moon", lambda: False, 0.3, interval=0.05)
    assert time.monotonic() - t0 < 5


def test_mounts_under_finds_deepest_first_and_only_below_roots():
    info = "\n".join(
        f"{i} 1 0:1 / {target} rw - tmpfs tmpfs rw"
        for i, target in enumerate(
            [
                "/",
                "/srv/state",
                "/srv/state/a/b",
                "/srv/state/a",
                "/srv/stateful",
                "/run/x/y",
                "/srv/with\\040space",
            ]
        )
    )
    got = leftovers.mounts_under(Path("/srv/state"), Path("/run/x"), mountinfo=info)
    assert got == ["/srv/state/a/b", "/srv/state/a", "/run/x/y", "/srv/state"] or set(got) == {
        "/srv/state/a/b",
        "/srv/state/a",
        "/run/x/y",
        "/srv/state",
    }
    assert got.index("/srv/state/a/b") < got.index("/srv/state/a") < got.index("/srv/state")
    assert "/srv/stateful" not in got


def openssl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=check, timeout=60)


def test_pki_is_made_once_and_verifies(paths: Paths):
    pki.ensure(paths)
    first = (paths.pki / "admin.crt").read_bytes()
    pki.ensure(paths)
    assert (paths.pki / "admin.crt").read_bytes() == first, "certificates must be generated once"
    for name in ("apiserver", "admin", "kubelet", "kubelet-serving", "controller-manager", "scheduler"):
        res = openssl(
            "verify", "-CAfile", str(paths.pki / "ca.crt"), str(paths.pki / f"{name}.crt"), check=False
        )
        assert res.returncode == 0, res.stdout + res.stderr
    text = openssl("x509", "-noout", "-text", "-in", str(paths.pki / "apiserver.crt")).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:kubernetes.default.svc" in text
    subj = openssl("x509", "-noout", "-subject", "-in", str(paths.pki / "admin.crt")).stdout
    assert "O = system:masters" in subj
    assert oct((paths.pki / "ca.key").stat().st_mode & 0o777) == "0o600"
    out = paths.state / "kc"
    pki.kubeconfig(paths, "admin", out)
    kc = yaml.safe_load(out.read_text())
    assert kc["clusters"][0]["cluster"]["server"] == "https://127.0.0.1:6443"
    assert oct(out.stat().st_mode & 0o777) == "0o600"


def test_kubelet_config_fits_these_machines(paths: Paths):
    cfg = yaml.safe_load(configs.kubelet(paths, "node-a").read_text())
    assert cfg["cgroupDriver"] == "cgroupfs"
    assert cfg["failCgroupV1"] is False and cfg["failSwapOn"] is False
    assert cfg["address"] == "127.0.0.1" and cfg["healthzBindAddress"] == "127.0.0.1"
    assert cfg["readOnlyPort"] == 0
    assert cfg["authentication"]["anonymous"]["enabled"] is False
    assert cfg["containerRuntimeEndpoint"] == f"unix://{paths.containerd_sock}"


def test_containerd_config_mirrors_registries_to_loopback(paths: Paths):
    text = configs.containerd(paths, ["/usr/lib/cni"]).read_text()
    assert "restrict_oom_score_adj = true" in text
    assert 'stream_server_address = "127.0.0.1"' in text
    assert "containerd.runtimes.kata]" in text and "containerd.runtimes.runc]" in text
    for upstream in ("docker.io", "registry.k8s.io", "quay.io"):
        hosts = (paths.etc / "containerd/certs.d" / upstream / "hosts.toml").read_text()
        assert '[host."http://127.0.0.1:5000"]' in hosts
    conflist = json.loads(configs.pod_network(paths).read_text())
    assert conflist["plugins"][0]["ipMasq"] is False
    assert conflist["plugins"][0]["ipam"]["dataDir"].startswith(str(paths.state))


def test_created_paths_ledger_removes_only_what_was_missing(paths: Paths, tmp_path: Path, monkeypatch):
    existing, created = tmp_path / "existing", tmp_path / "created"
    existing.mkdir()
    monkeypatch.setattr(leftovers.CreatedPaths, "WATCHED", (str(existing), str(created)))
    ledger = leftovers.CreatedPaths(paths)
    ledger.record_before_up()
    created.mkdir()
    (created / "f").write_text("x")
    assert ledger.remove() == [str(created)]
    assert existing.exists() and not created.exists()


def test_vm_network_conflist_is_what_the_macvtap_plugin_accepts(paths: Paths):
    from cni_macvtap import config as macvtap_config
    from cni_macvtap import hostlocal
    from cni_macvtap.environment import Invocation

    path = configs.vm_network(paths)
    assert path == paths.state / "etc" / "cni-vm" / "10-edgevirt-vm.conflist"
    conflist = json.loads(path.read_text())
    assert conflist["cniVersion"] == "1.0.0" and conflist["name"] == "edgevirt-vm"
    [plugin] = conflist["plugins"]
    assert plugin["type"] == "macvtap" and plugin["master"] == "evvm0" and plugin["mode"] == "bridge"
    assert plugin["capabilities"] == {"mac": True}
    assert plugin["daemonSocket"] == "/run/edgevirt/macvtap.sock"
    # Leases and attachment records live under the cluster's state dir, so down removes them.
    assert plugin["stateDir"].startswith(str(paths.state))
    ipam = plugin["ipam"]
    assert ipam["dataDir"].startswith(str(paths.state))
    assert ipam["ranges"] == [
        [
            {
                "subnet": "10.245.0.0/24",
                "rangeStart": "10.245.0.10",
                "rangeEnd": "10.245.0.129",
                "gateway": "10.245.0.1",
            }
        ]
    ]
    assert ipam["routes"] == [{"dst": "0.0.0.0/0"}]
    # The plugin's own validation accepts it (as libcni hands it over: the list's name and version)...
    doc = {"cniVersion": conflist["cniVersion"], "name": conflist["name"], **plugin}
    conf = macvtap_config.parse(Invocation(command="ADD", container_id="c1", ifname="eth0"), doc)
    assert conf.master == "evvm0" and conf.mode == "bridge"
    assert conf.device_dir == "/run/edgevirt/macvtap" and conf.state_dir == plugin["stateDir"]
    # ... and its daemon serves this host-local config in-process (no exec of the reference binary).
    served = hostlocal.supported(doc, {})
    assert served is not None and served.directory == f"{ipam['dataDir']}/edgevirt-vm"
    # Written once: a second call leaves the file alone.
    mtime = path.stat().st_mtime_ns
    configs.vm_network(paths)
    assert path.stat().st_mtime_ns == mtime


def test_the_node_install_routes_kvm_to_the_vm_backend(paths: Paths, tmp_path: Path):
    """The cluster's call of `edgevirt-node install` (as up makes it, under a scratch root) writes
    an edgevirt-cri config that routes kvm to the kvm handler with the cluster's paths, and units whose
    ExecStart lines are what up runs."""
    from localcluster import nodeinstall

    from cri_shim import config as cri_config

    configs.vm_network(paths)
    root = tmp_path / "root"
    root.mkdir()
    argv = nodeinstall.install_argv(paths)
    argv[0] = str(REPO / ".venv/bin/edgevirt-node")  # the checkout's own install of the same code
    out = subprocess.run(
        [*argv, f"--root={root}", "--no-socket-check"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)["info"]
    cri = info["units"][nodeinstall.CRI_UNIT]["exec_start"]
    assert cri[1] == f"--config={paths.etc / 'edgevirt-cri.yaml'}"
    assert info["kubelet"]["containerRuntimeEndpoint"] == f"unix://{paths.cri_sock}"
    loaded = cri_config.load(str(root / str(paths.etc / "edgevirt-cri.yaml").lstrip("/")))
    assert loaded.handlers == {"": "containerd", "runc": "containerd", "kata": "containerd", "kvm": "kvm"}
    kvm = loaded.backends["kvm"]
    assert kvm.factory == "cri_shim.kvm:create"
    assert kvm.options["state_dir"] == str(paths.kvm_state)
    assert kvm.options["cni_conflist"] == str(paths.vm_cni_conflist)
    assert kvm.options["kubelet_root_dir"] == str(paths.kubelet_dir)
    assert kvm.options["insecure_registries"] == ["127.0.0.1:5000"]
    assert loaded.backends["containerd"].socket == str(paths.containerd_sock)


def test_vm_network_comes_before_edgevirt_cri():
    """The kvm backend is registered only if available when edgevirt-cri starts: libvirtd, the VM
    network and the macvtap daemon must be up by then."""
    from localcluster.components import COMPONENTS

    order = [c.name for c in COMPONENTS]
    cri = order.index("edgevirt-cri")
    for before in ("containerd", "libvirtd", "vm-network", "node-install", "macvtap-daemon"):
        assert order.index(before) < cri, order
    assert order[-1] == "kubelet"
    assert order.index("node-install") < order.index("libvirtd")  # libvirtd reads what it wrote


def test_tap_nodes_and_stale_socket_are_removed(tmp_path: Path):
    import socket

    devs = tmp_path / "macvtap"
    (devs / "c1").mkdir(parents=True)
    (devs / "c1" / "eth0").write_text("")
    assert leftovers.tap_nodes(devs) == [str(devs / "c1" / "eth0")]
    assert leftovers.remove_tap_nodes(devs) == [str(devs / "c1" / "eth0")]
    assert devs.is_dir() and not list(devs.iterdir())
    assert leftovers.tap_nodes(tmp_path / "missing") == []
    # A socket that answers stays; one nobody listens on goes.
    path = tmp_path / "d.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        assert not leftovers.remove_stale_socket(path) and path.exists()
    finally:
        live.close()
    assert leftovers.remove_stale_socket(path) and not path.exists()
    assert not leftovers.remove_stale_socket(path)


def test_unix_listening_reads_the_socket_table():
    table = (
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 77727 /run/edgevirt/macvtap.sock\n"
        "0000000000000000: 00000003 00000000 00000000 0001 03 77730 /run/edgevirt/connected.sock\n"
        "0000000000000000: 00000002 00000000 00010000 0001 01 77731 /run/with space.sock\n"
    )
    assert health.unix_listening(Path("/run/edgevirt/macvtap.sock"), table)
    assert not health.unix_listening(Path("/run/edgevirt/connected.sock"), table)  # not listening
    assert health.unix_listening(Path("/run/with space.sock"), table)
    assert not health.unix_listening(Path("/run/edgevirt"), table)


def test_second_node_identity_differs_where_two_nodes_on_one_machine_must(monkeypatch, paths: Paths):
    from localcluster.paths import NODE_ENV, this_node

    monkeypatch.delenv(NODE_ENV, raising=False)
    one = this_node()
    monkeypatch.setenv(NODE_ENV, "2")
    two = this_node()
    assert (one.index, two.index) == (1, 2)
    assert two.name == "edgevirt-local-2" and one.name != two.name
    assert one.pod_cidr != two.pod_cidr and one.cgroup_root != two.cgroup_root
    # the VM ranges share the LAN's subnet but not an address
    first = {ipaddress.ip_address(a) for a in one.vm_range}
    second = {ipaddress.ip_address(a) for a in two.vm_range}
    assert max(first) < min(second)
    [[rng]] = json.loads(configs.vm_network(paths).read_text())["plugins"][0]["ipam"]["ranges"]
    assert (rng["rangeStart"], rng["rangeEnd"]) == two.vm_range
    kubelet = configs.kubelet(paths, two.name).read_text()
    assert "address: 10.243.0.2\n" in kubelet and "cgroupRoot: /edgevirt-node2\n" in kubelet


def test_up_takes_one_or_two_nodes_and_says_so_otherwise(monkeypatch):
    from localcluster import cluster
    from localcluster.paths import NODE_ENV

    monkeypatch.delenv(NODE_ENV, raising=False)
    for argv, nodes, rest in (
        (["--nodes", "2"], 2, []),
        (["--nodes=1", "kubelet"], 1, ["kubelet"]),
        (["kubelet"], None, ["kubelet"]),
    ):
        assert cluster._take_nodes(argv) == nodes and argv == rest
    for bad in (["--nodes", "3"], ["--nodes"], ["--nodes=two"]):
        with pytest.raises(cluster.ClusterError, match="the local cluster has 1 or 2 nodes"):
            cluster._take_nodes(bad)
    monkeypatch.setenv(NODE_ENV, "2")
    with pytest.raises(cluster.ClusterError, match="not inside node 2"):
        cluster._take_nodes(["--nodes", "2"])


def test_the_second_node_reaches_only_the_api_server_and_the_registry_on_the_hosts_loopback():
    from localcluster import secondnode

    host = secondnode._host_rules()
    [dnat] = [r for t, c, r in host if c == secondnode.HOST_NAT_CHAIN]
    assert dnat[dnat.index("--dports") + 1] == "6443,5000" and dnat[-1] == "127.0.0.1"
    assert dnat[dnat.index("-i") + 1] == "evnode2"
    [drop] = [r for t, c, r in host if c == secondnode.HOST_FW_CHAIN]
    assert drop[-2:] == ["-j", "DROP"] and "DNAT" in drop[drop.index("--ctstate") + 1]
    inside = secondnode._node_rules()
    targets = {r[r.index("--to-destination") + 1] for t, c, r in inside if "DNAT" in r}
    assert targets == {"10.243.0.1", "10.243.0.1:6443"}  # the host's end of the link, nothing else
