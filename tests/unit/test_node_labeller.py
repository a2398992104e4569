"""The node labeller: the decision table (probe verdict + what edgevirt-cri serves -> the Node's
labels), the passes against a fake Node API (one merge patch of edgevirt.io/ labels only; while
edgevirt-cri does not answer the handler labels stay as they were; /dev/kvm appearing re-probes),
the node the credentials name, and the CRI Status query against a real gRPC server."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from cri_shim import protos
from cri_shim.node.kubeapi import NodeApiError, node_of
from cri_shim.node.labeller import STATUS_METHOD, Labeller, cri_view, resolve_node
from runtimeclass.labels import (
    LABEL_KVM_HANDLER,
    Cri,
    CriView,
    node_labels,
    removal_patch,
    set_patch,
)
from runtimeclass.result import LABEL_ACCEL, LABEL_KATA, LABEL_KVM, Check, ProbeResult

pytestmark = pytest.mark.timeout(60)

ANSWERED_KVM = CriView(Cri.ANSWERED, frozenset({"", "runc", "kvm"}))
ANSWERED_ALL = CriView(Cri.ANSWERED, frozenset({"", "runc", "kata", "kvm"}))
ANSWERED_NONE = CriView(Cri.ANSWERED, frozenset({"", "runc"}))
ABSENT = CriView(Cri.ABSENT)
SILENT = CriView(Cri.SILENT)


def labels(kvm: str, accel: str, kata: str, handler: str) -> dict[str, str]:
    return {LABEL_KVM: kvm, LABEL_ACCEL: accel, LABEL_KATA: kata, LABEL_KVM_HANDLER: handler}


@pytest.mark.parametrize(
    ("kvm_ok", "cri", "current", "expected"),
    [
        # edgevirt-cri answered: the handler labels are what it serves; kata needs KVM too
        (True, ANSWERED_ALL, {}, labels("true", "kvm", "true", "true")),
        (False, ANSWERED_ALL, {}, labels("false", "tcg", "false", "true")),  # these machines, with Kata
        (False, ANSWERED_KVM, {}, labels("false", "tcg", "false", "true")),  # these machines
        (True, ANSWERED_NONE, {}, labels("true", "kvm", "false", "false")),  # kvm backend unavailable
        # no socket: not an edgevirt node, whatever was written before
        (True, ABSENT, labels("true", "kvm", "true", "true"), labels("true", "kvm", "false", "false")),
        # a socket that does not answer: the handler labels stay as they were (false when unset)
        (True, SILENT, labels("true", "kvm", "true", "true"), labels("true", "kvm", "true", "true")),
        (False, SILENT, labels("false", "tcg", "false", "true"), labels("false", "tcg", "false", "true")),
        (True, SILENT, {}, labels("true", "kvm", "false", "false")),
        (False, SILENT, labels("true", "kvm", "true", "true"), labels("false", "tcg", "false", "true")),
    ],
)
def test_the_decision_table(kvm_ok: bool, cri: CriView, current: dict, expected: dict) -> None:
    assert node_labels(kvm_ok, cri, current) == expected


def test_patches_touch_only_edgevirt_labels() -> None:
    node = {"kubernetes.io/hostname": "n1", LABEL_KVM: "false", "edgevirt.io/other": "x"}
    assert removal_patch(node) == {"metadata": {"labels": {"edgevirt.io/other": None, LABEL_KVM: None}}}
    assert removal_patch({"kubernetes.io/hostname": "n1"}) is None
    assert set_patch({LABEL_KVM: "true"}) == {"metadata": {"labels": {LABEL_KVM: "true"}}}
    with pytest.raises(ValueError, match=r"kubernetes\.io/hostname"):
        set_patch({"kubernetes.io/hostname": "evil"})


def test_the_node_of_the_credentials() -> None:
    assert node_of("system:node:vm", {}) == "vm"
    extra = {"authentication.kubernetes.io/node-name": ["n2"]}
    assert node_of("system:serviceaccount:edgevirt-system:edgevirt-node", extra) == "n2"
    assert node_of("admin", {}) is None


class FakeNodes:
    """A Node API for one node: applies merge patches to its labels, records them."""

    def __init__(self, labels: dict[str, str] | None = None, user: str = "system:node:n1") -> None:
        self.node_labels = {"kubernetes.io/hostname": "n1", **(labels or {})}
        self.patches: list[Mapping[str, object]] = []
        self.user = user
        self.fail: str | None = None

    def whoami(self) -> tuple[str, dict[str, list[str]]]:
        return self.user, {}

    def labels(self, node: str) -> dict[str, str]:
        assert node == "n1"
        return dict(self.node_labels)

    def patch_labels(self, node: str, patch: Mapping[str, object]) -> dict[str, str]:
        assert node == "n1"
        if self.fail:
            raise NodeApiError(self.fail)
        self.patches.append(patch)
        for k, v in patch["metadata"]["labels"].items():  # type: ignore[index]
            if v is None:
                self.node_labels.pop(k, None)
            else:
                self.node_labels[k] = v
        return dict(self.node_labels)


def verdict(kvm_ok: bool) -> ProbeResult:
    reason = "booted" if kvm_ok else "the guest hangs"
    no = Check(False, "n/a")
    return ProbeResult(kvm=Check(kvm_ok, reason), tcg=Check(True, "ok"), kata=no, libvirt=no, key={})


def labeller(api: FakeNodes, cri: CriView, kvm_ok: bool, tmp_path: Path, calls: list[bool]) -> Labeller:
    def probe(refresh: bool) -> ProbeResult:
        calls.append(refresh)
        return verdict(kvm_ok)

    return Labeller(api, "n1", tmp_path / "cri.sock", probe, cri=lambda _: cri, kvm_device=tmp_path / "kvm")


def test_a_pass_writes_all_four_labels_in_one_patch(tmp_path: Path) -> None:
    api, calls = FakeNodes(), []
    labeller(api, ANSWERED_KVM, False, tmp_path, calls).run_once()
    assert api.patches == [{"metadata": {"labels": labels("false", "tcg", "false", "true")}}]
    assert api.node_labels["kubernetes.io/hostname"] == "n1"


def test_while_the_cri_is_silent_the_handler_labels_stay(tmp_path: Path) -> None:
    api, calls = FakeNodes(labels("false", "tcg", "false", "true")), []
    view = labeller(api, SILENT, False, tmp_path, calls).run_once()
    assert view.state is Cri.SILENT
    assert api.patches == [{"metadata": {"labels": {LABEL_KVM: "false", LABEL_ACCEL: "tcg"}}}]
    assert api.node_labels[LABEL_KVM_HANDLER] == "true"
    fresh = FakeNodes()  # nothing known yet: the handler labels are written as false
    labeller(fresh, SILENT, False, tmp_path, calls).run_once()
    assert fresh.node_labels == {"kubernetes.io/hostname": "n1", **labels("false", "tcg", "false", "false")}


def test_kvm_device_appearing_or_vanishing_reprobes(tmp_path: Path) -> None:
    api, calls = FakeNodes(), []
    lab = labeller(api, ANSWERED_KVM, False, tmp_path, calls)
    lab.run_once()
    lab.run_once()
    (tmp_path / "kvm").write_text("")
    lab.run_once()
    lab.run_once()
    (tmp_path / "kvm").unlink()
    lab.run_once()
    assert calls == [False, False, True, False, True]


def test_the_loop_retries_soon_after_a_failure_and_stops_on_request(tmp_path: Path) -> None:
    api, calls = FakeNodes(), []
    api.fail = "403 Forbidden"
    lab = labeller(api, ANSWERED_KVM, False, tmp_path, calls)
    stop = threading.Event()
    waits: list[float] = []

    def fake_wait(seconds: float) -> bool:
        waits.append(seconds)
        api.fail = None
        if len(waits) == 2:
            stop.set()
        return stop.is_set()

    stop.wait = fake_wait  # type: ignore[method-assign]
    lab.run(stop, interval=600, retry=30)
    assert waits == [30, 600] and len(api.patches) == 1


def test_the_node_comes_from_the_flag_the_environment_or_the_credentials(monkeypatch) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    assert resolve_node(FakeNodes(), "given") == "given"
    assert resolve_node(FakeNodes(), None) == "n1"
    monkeypatch.setenv("NODE_NAME", "from-env")
    assert resolve_node(FakeNodes(), None) == "from-env"
    monkeypatch.delenv("NODE_NAME")
    with pytest.raises(NodeApiError, match="pass --node"):
        resolve_node(FakeNodes(user="admin"), None)


@pytest.fixture
def cri_server(tmp_path: Path):
    """A gRPC server on a unix socket answering CRI Status with runtime handlers kvm and runc."""
    api = protos.api()

    def status(request: bytes, context: grpc.ServicerContext) -> bytes:
        out = api.StatusResponse()
        for name in ("runc", "kvm"):
            out.runtime_handlers.add(name=name)
        return out.SerializeToString()

    handler = grpc.method_handlers_generic_handler(
        "runtime.v1.RuntimeService",
        {"Status": grpc.unary_unary_rpc_method_handler(status)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    sock = tmp_path / "cri.sock"
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    try:
        yield sock
    finally:
        server.stop(None)


def test_cri_status_is_asked_on_the_socket(cri_server: Path, tmp_path: Path) -> None:
    assert STATUS_METHOD == "/runtime.v1.RuntimeService/Status"
    assert cri_view(cri_server) == CriView(Cri.ANSWERED, frozenset({"runc", "kvm"}))
    assert cri_view(tmp_path / "absent.sock", absent_grace=0.5, poll=0.1) == ABSENT
    (tmp_path / "dead.sock").write_text("")  # something there that does not answer
    assert cri_view(tmp_path / "dead.sock", timeout=2).state is Cri.SILENT


def test_a_socket_missing_for_a_moment_is_a_restart_not_an_absence(cri_server: Path, tmp_path: Path) -> None:
    """edgevirt-cri restarting removes its socket for a moment; a pass that ran then must not take
    the kvm handler away (kvm-handler=false evicts the node-mode pod for a whole --interval)."""
    later = tmp_path / "later.sock"
    timer = threading.Timer(1.0, lambda: later.symlink_to(cri_server))
    timer.start()
    try:
        view = cri_view(later, absent_grace=15, poll=0.1)
    finally:
        timer.cancel()
    assert view == CriView(Cri.ANSWERED, frozenset({"runc", "kvm"}))


def test_the_labeller_asks_from_a_child_and_keeps_no_grpc(cri_server: Path) -> None:
    """The CRI Status call runs in a child interpreter: the labeller itself never imports grpc."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from cri_shim.node.labeller import cri_view; "
        "v = cri_view(Path(sys.argv[1])); print(sorted(v.handlers), 'grpc' in sys.modules)"
    )
    root = str(Path(__file__).resolve().parents[2])
    r = subprocess.run(
        [sys.executable, "-c", code, str(cri_server)],
        capture_output=True, text=True, timeout=120, cwd=root, env={"PYTHONPATH": root}, check=True,
    )  # fmt: skip
    assert r.stdout.split("\n")[0] == "['kvm', 'runc'] False"


def test_one_pass_exits_1_while_the_cri_is_silent_so_the_loop_retries_soon(monkeypatch, capsys) -> None:
    from cri_shim.node import cli, kubeapi
    from cri_shim.node import labeller as labeller_mod

    monkeypatch.setattr(kubeapi, "KubeNodeApi", lambda kubeconfig: object())
    monkeypatch.setattr(labeller_mod, "resolve_node", lambda api, node: "node-1")
    for view, code in ((SILENT, 1), (ANSWERED_KVM, 0)):
        monkeypatch.setattr(labeller_mod.Labeller, "run_once", lambda self, v=view: v)
        assert cli.main(["label", "--once", "--node", "node-1", "--cri-socket", "/run/x.sock"]) == code
    assert "edgevirt-cri did not answer at /run/x.sock" in capsys.readouterr().err
