"""containerd (CRI) runs a pod whose network is a conflist using `macvtap`; PodSandboxStatus shows our IP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from helpers.cni_env import REPO, Topology, links
from helpers.containerd import PAUSE_IMAGE, PrivateContainerd
from helpers.crictl import Crictl
from helpers.pause_image import build_pause_image

pytestmark = pytest.mark.root
CRICTL = Path.home() / ".cache/edgevirt/go/cri-tools-v1.34.0/crictl"


def test_containerd_pod_gets_a_macvtap_and_our_ip(topo: Topology) -> None:
    for tool in ("containerd", "ctr", "runc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed: apt-get install containerd runc")
    if not CRICTL.is_file():
        pytest.skip(f"crictl not built at {CRICTL}: run deploy/install/build-go-tools")
    tmp = topo.tmp
    bin_dir = tmp / "cni-bin"
    subprocess.run(
        [str(REPO / "deploy/cni/install-plugin"), "--dest", str(bin_dir)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    plugin = {k: v for k, v in topo.conf().items() if k not in ("cniVersion", "name")}
    # containerd 1.6 links libcni 1.1, which speaks config versions up to 1.0.0.
    conflist = {"cniVersion": "1.0.0", "name": f"ctrd-{topo.tag}", "plugins": [plugin]}
    # the sandbox image the config names, built here: nothing is pulled from outside
    image = tmp / "pause.tar"
    build_pause_image(image, PAUSE_IMAGE)
    # containerd runs in the topology's host netns, where the master is
    ctrd = PrivateContainerd.create(netns=topo.host, cni_bin_dir=bin_dir, crictl_binary=str(CRICTL))
    crictl = Crictl(ctrd.endpoint, binary=str(CRICTL), request_timeout="120s", timeout=180)
    pod_id = ""
    try:
        ctrd.write_cni_conflist(conflist, "10-macvtap.conflist")
        ctrd.start()
        imported = ctrd.ctr("images", "import", str(image))
        assert imported.returncode == 0, imported.stdout + imported.stderr
        pod_cfg = tmp / "pod.json"
        pod_cfg.write_text(
            json.dumps(
                {
                    "metadata": {"name": f"vm-{topo.tag}", "namespace": "default", "uid": str(uuid.uuid4())},
                    "log_directory": str(tmp / "logs"),
                    "linux": {},
                }
            )
        )
        run = crictl("runp", str(pod_cfg), check=False)
        assert run.returncode == 0, run.stdout + run.stderr + ctrd.log_tail()
        pod_id = run.stdout.strip()
        status = json.loads(crictl("inspectp", pod_id, check=False).stdout)
        ip = status["status"]["network"]["ip"]
        assert ip.startswith(topo.prefix + "."), status["status"]["network"]
        assert [ip + "/24"] == [f"{a}/24" for a in topo.allocated_ips(f"ctrd-{topo.tag}")]
        netns = status["info"]["runtimeSpec"]["linux"]["namespaces"]
        [path] = [n["path"] for n in netns if n["type"] == "network"]
        # the macvtap lives in the pod's netns, named eth0, on our master; its tap node is published
        out = subprocess.run(["nsenter", f"--net={path}", "ip", "-d", "-j", "link", "show", "eth0"],
                             capture_output=True, text=True, check=True, timeout=60).stdout  # fmt: skip
        assert json.loads(out)[0]["linkinfo"]["info_kind"] == "macvtap"
        assert (topo.device_dir / pod_id / "eth0").exists()
        assert f"ADD {pod_id}/eth0 ok" in topo.daemon_log()
    finally:
        try:
            if pod_id:
                stop = crictl("stopp", pod_id, check=False)
                rm = crictl("rmp", pod_id, check=False)
                assert stop.returncode == 0 and rm.returncode == 0, stop.stderr + rm.stderr
        finally:
            ctrd.close()
    assert topo.allocated_ips(f"ctrd-{topo.tag}") == []
    assert os.listdir(topo.device_dir) == [] if topo.device_dir.exists() else True
    assert set(links(topo.host)) == {"lo", "vm0"}
