"""cri_shim.kube_http, node mode's thin Kubernetes client, without a cluster: kubeconfig and in-cluster
loading (contexts, relative paths, CA and client certificate data, the errors that name the field and
the fix, a rotated service account token), calls and error answers, watch lines streamed as they come,
an Informer over it, TLS with a throwaway CA (made with the openssl command when there is one), and
that node mode never imports the kubernetes client."""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cri_shim.kube_http import (
    ClusterAccess,
    KubeConfigError,
    KubeHttpClient,
    TokenFile,
    load_config,
    load_in_cluster,
    load_kubeconfig,
)
from cri_shim.kube_rest import MERGE_PATCH, ApiError, api_error
from vmcrd.kube import Informer, RestListWatch
from vmcrd.resources import VirtualMachines
from vmcrd.runner import RetryDelays, Runner

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------------------------ the fake API server
@dataclass
class Stream:
    """An answer sent as chunked lines, ``pause`` seconds apart (a watch)."""

    lines: list[str]
    pause: float = 0.0


@dataclass
class FakeApiServer:
    """Records every request; answers with the next of ``answers``: (status, JSON body) or a Stream."""

    tls: ssl.SSLContext | None = None
    seen: list[dict[str, Any]] = field(default_factory=list)
    answers: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                peer = self.connection.getpeercert() if fake.tls else None
                fake.seen.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "auth": self.headers.get("Authorization"),
                        "type": self.headers.get("Content-Type"),
                        "body": json.loads(raw) if raw else None,
                        "peer": dict(x[0] for x in peer["subject"]) if peer else None,
                    }
                )
                answer = fake.answers.pop(0)
                if isinstance(answer, Stream):
                    self._stream(answer)
                else:
                    self._json(*answer)

            def _json(self, status: int, body: Any) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, stream: Stream) -> None:
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for line in stream.lines:
                        data = (line + "\n").encode()
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                        self.wfile.flush()
                        time.sleep(stream.pause)
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:
                    pass  # the client hung up early

            do_GET = do_POST = do_PATCH = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def apiserver() -> Iterator[FakeApiServer]:
    fake = FakeApiServer()
    try:
        yield fake
    finally:
        fake.close()


def client_of(fake: FakeApiServer, **access: Any) -> KubeHttpClient:
    return KubeHttpClient(ClusterAccess(server=fake.url, **access))


# ------------------------------------------------------------------------------------ kubeconfig
KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- {name: a, cluster: {server: "https://127.0.0.1:6443/", certificate-authority: pki/ca.crt}}
- {name: b, cluster: {server: "https://127.0.0.2:6443", certificate-authority-data: %(ca)s,
                      tls-server-name: api.example}}
users:
- {name: u, user: {token: t, client-certificate: /abs/cert.pem, client-key: key.pem}}
- {name: v, user: {tokenFile: tok}}
contexts:
- {name: one, context: {cluster: a, user: u, namespace: ns1}}
- {name: two, context: {cluster: b, user: v}}
current-context: one
"""
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


@pytest.fixture
def kubeconfig(tmp_path: Path) -> str:
    return write(tmp_path / "kc" / "config", KUBECONFIG % {"ca": base64.b64encode(CA_PEM.encode()).decode()})


def test_the_current_context_with_paths_relative_to_the_kubeconfig(kubeconfig: str) -> None:
    access = load_kubeconfig(kubeconfig)
    folder = Path(kubeconfig).parent
    assert access == ClusterAccess(
        server="https://127.0.0.1:6443",
        ca_file=str(folder / "pki/ca.crt"),
        cert_file="/abs/cert.pem",
        key_file=str(folder / "key.pem"),
        token="t",
    )


def test_a_named_context_with_ca_data_and_a_token_file(kubeconfig: str) -> None:
    access = load_kubeconfig(kubeconfig, "two")
    assert (access.server, access.ca_data, access.tls_server_name) == (
        "https://127.0.0.2:6443",
        CA_PEM,
        "api.example",
    )
    assert access.token_file == str(Path(kubeconfig).parent / "tok") and access.token is None


def test_kubeconfig_env_lists_files_merged_first_wins(tmp_path: Path, kubeconfig: str, monkeypatch) -> None:
    other = write(
        tmp_path / "other",
        "clusters: [{name: a, cluster: {server: https://other}}, {name: c, cluster: {server: https://c}}]\n"
        "users: []\ncontexts: [{name: three, context: {cluster: c}}]\ncurrent-context: three\n",
    )
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join([other, str(tmp_path / "absent"), kubeconfig]))
    assert load_kubeconfig().server == "https://c"  # the first file's current-context
    assert load_kubeconfig(context="one").server == "https://other"  # the first file's cluster "a"
    assert load_kubeconfig(context="two").token_file == str(Path(kubeconfig).parent / "tok")


@pytest.mark.parametrize(
    ("text", "context", "says"),
    [
        (
            "clusters: []\ncontexts: []\n",
            None,
            r"current-context is not set: set it \(kubectl config use-context",
        ),
        (KUBECONFIG, "nine", r'context "nine" is not in contexts \(there: one, two\): use one of those'),
        (
            KUBECONFIG.replace("cluster: a, user: u", "cluster: z, user: u"),
            None,
            r'context "one" names cluster "z", which is not in clusters: add it or fix contexts\[one\]',
        ),
        (
            KUBECONFIG.replace('server: "https://127.0.0.1:6443/", ', ""),
            None,
            r"clusters\[a\]\.cluster\.server is not set: set it to the API server's URL",
        ),
        (
            KUBECONFIG,
            "two",
            r"clusters\[b\]\.cluster\.certificate-authority-data is not base64: put the base64",
        ),
        (
            KUBECONFIG.replace(
                "{token: t, client-certificate: /abs/cert.pem, client-key: key.pem}", "{exec: {}}"
            ),
            None,
            r"users\[u\]\.user\.exec \(a credential plugin\) is not supported .* give the user a token",
        ),
        (
            KUBECONFIG.replace(", client-key: key.pem", ""),
            None,
            r"users\[u\]\.user\.client-key\(-data\) is not set: a client certificate needs both",
        ),
        ("[1, 2]", None, "not a mapping of clusters, users and contexts: fix the file"),
        ("a: [", None, "not YAML .*: fix the file or pass another one"),
    ],
)
def test_a_bad_kubeconfig_names_the_field_and_the_fix(tmp_path: Path, text: str, context, says: str) -> None:
    path = write(tmp_path / "config", text % {"ca": "not*base64"} if "%(ca)s" in text else text)
    with pytest.raises(KubeConfigError, match=says) as err:
        load_kubeconfig(path, context)
    assert path in str(err.value)


def test_a_missing_kubeconfig_says_so(tmp_path: Path) -> None:
    with pytest.raises(
        KubeConfigError, match=r"missing: no such file: pass an existing file to --kubeconfig"
    ):
        load_config(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------ in cluster
@pytest.fixture
def account(tmp_path: Path) -> Path:
    folder = tmp_path / "sa"
    write(folder / "token", "tok-1\n")
    write(folder / "ca.crt", CA_PEM)
    return folder


def test_in_cluster_config_from_the_environment_and_the_service_account(account: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert load_in_cluster(env, account) == ClusterAccess(
        server="https://10.96.0.1:443", ca_file=str(account / "ca.crt"), token_file=str(account / "token")
    )
    env["KUBERNETES_SERVICE_HOST"] = "fd00::1"
    assert load_in_cluster(env, account).server == "https://[fd00::1]:443"


def test_in_cluster_config_errors_name_the_fix(account: Path) -> None:
    with pytest.raises(KubeConfigError, match=r"KUBERNETES_SERVICE_HOST .* not set: pass --kubeconfig"):
        load_in_cluster({}, account)
    (account / "token").unlink()
    env = {"KUBERNETES_SERVICE_HOST": "h", "KUBERNETES_SERVICE_PORT": "1"}
    with pytest.raises(KubeConfigError, match=r"no service account token .* automountServiceAccountToken"):
        load_in_cluster(env, account)


def test_no_kubeconfig_anywhere_means_in_cluster(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeConfigError, match="not in a pod"):  # the in-cluster loader's word
        load_config()
    with pytest.raises(KubeConfigError, match=r"no kubeconfig: .* pass --kubeconfig"):
        load_config(in_cluster=False)


def test_a_rotated_token_file_is_read_again(apiserver: FakeApiServer, account: Path) -> None:
    token = account / "token"
    kube = client_of(apiserver, token_file=str(token))
    apiserver.answers += [(200, {}), (200, {}), (200, {})]
    kube.request("GET", "/version")
    kube.request("GET", "/version")
    fresh = account / "token.new"
    fresh.write_text("tok-2-longer")
    fresh.replace(token)  # as kubelet swaps a projected volume's files: a new file
    kube.request("GET", "/version")
    assert [s["auth"] for s in apiserver.seen] == ["Bearer tok-1", "Bearer tok-1", "Bearer tok-2-longer"]


def test_token_file_is_not_read_again_while_unchanged(account: Path, monkeypatch) -> None:
    tokens = TokenFile(str(account / "token"))
    assert tokens.current() == "tok-1"
    monkeypatch.setattr("builtins.open", lambda *a, **kw: pytest.fail("read again"))
    assert tokens.current() == "tok-1"


# ------------------------------------------------------------------------------------ calls
def test_request_sends_json_with_the_credentials_and_returns_the_answer(apiserver: FakeApiServer) -> None:
    apiserver.answers += [(200, {"kind": "Node"}), (200, None)]
    kube = client_of(apiserver, token="sekret")
    got = kube.request(
        "PATCH", "/api/v1/nodes/n1", {"a": None}, query={"dryRun": "All"}, content_type=MERGE_PATCH
    )
    assert got == {"kind": "Node"}
    assert kube.request("GET", "/empty") is None
    assert apiserver.seen[0] == {
        "method": "PATCH",
        "path": "/api/v1/nodes/n1?dryRun=All",
        "auth": "Bearer sekret",
        "type": MERGE_PATCH,
        "body": {"a": None},
        "peer": None,
    }
    assert apiserver.seen[1]["type"] is None


def test_basic_auth_when_the_user_has_a_password(apiserver: FakeApiServer) -> None:
    apiserver.answers.append((200, {}))
    client_of(apiserver, username="admin", password="pw").request("GET", "/version")
    assert apiserver.seen[0]["auth"] == "Basic " + base64.b64encode(b"admin:pw").decode()


def test_an_error_answer_is_an_api_error_with_status_reason_and_body(apiserver: FakeApiServer) -> None:
    apiserver.answers.append((409, {"kind": "Status", "message": "the object has been modified"}))
    with pytest.raises(ApiError) as err:
        client_of(apiserver).request("PATCH", "/apis/g/v/x", {})
    assert (err.value.status, err.value.reason) == (409, "Conflict")
    assert json.loads(err.value.body or "")["message"] == "the object has been modified"
    assert str(err.value) == "(409) Reason: Conflict: the object has been modified"
    assert api_error(err.value) is err.value
    assert api_error(RuntimeError("x")) is None


def test_the_kubernetes_clients_exception_counts_as_an_api_error() -> None:
    from kubernetes.client.exceptions import ApiException

    err = api_error(ApiException(status=410, reason="Gone"))
    assert err is not None and (err.status, err.reason) == (410, "Gone")


def test_watch_lines_come_as_they_are_sent(apiserver: FakeApiServer) -> None:
    apiserver.answers.append(Stream(['{"n": 1}', "", '{"n": 2}'], pause=0.3))
    lines = client_of(apiserver).stream_lines("/api/v1/pods", query={"watch": "true"}, timeout=(5, 10))
    started = time.monotonic()
    assert next(lines) == '{"n": 1}'
    assert time.monotonic() - started < 0.3  # not after the whole answer
    assert list(lines) == ['{"n": 2}']
    assert apiserver.seen[0]["path"] == "/api/v1/pods?watch=true"


def test_a_watch_ended_early_and_a_refused_watch(apiserver: FakeApiServer) -> None:
    kube = client_of(apiserver)
    apiserver.answers += [Stream([f'{{"n": {i}}}' for i in range(50)], pause=0.05), (403, {"message": "no"})]
    lines = kube.stream_lines("/w")
    assert next(lines) == '{"n": 0}'
    lines.close()  # the connection is closed, not reused with unread data
    with pytest.raises(ApiError) as err:
        next(kube.stream_lines("/w"))
    assert err.value.status == 403


def test_informer_lists_and_watches_through_the_thin_client(apiserver: FakeApiServer) -> None:
    def vm(name: str, rv: str) -> dict:
        return {"metadata": {"namespace": "ns", "name": name, "resourceVersion": rv}}

    events = [
        {"type": "ADDED", "object": vm("b", "11")},
        {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}},
        {"type": "DELETED", "object": vm("a", "13")},
    ]
    apiserver.answers += [
        (200, {"items": [vm("a", "9")], "metadata": {"resourceVersion": "10"}}),
        Stream([json.dumps(e) for e in events]),
    ]
    kube = client_of(apiserver)
    seen: list[str] = []
    stop = threading.Event()
    inf = Informer("virtualmachines", VirtualMachines(kube).list_watch("ns"), seen.append, watch_timeout=7)

    def handler(key: str) -> None:
        seen.append(key)
        if len(seen) == 3:
            stop.set()

    inf.handler = handler
    inf.watch(inf.relist(), stop)
    assert seen == ["ns/a", "ns/b", "ns/a"] and inf.cached_keys() == ["ns/b"]
    base = "/apis/edgevirt.io/v1alpha1/namespaces/ns/virtualmachines"
    assert [s["path"] for s in apiserver.seen] == [
        base,
        f"{base}?watch=true&resourceVersion=10&allowWatchBookmarks=true&timeoutSeconds=7",
    ]


def test_vm_writes_are_merge_patches(apiserver: FakeApiServer) -> None:
    apiserver.answers += [(200, {"metadata": {}}), (200, {})]
    vms = VirtualMachines(client_of(apiserver))
    vm = {"metadata": {"namespace": "n s", "name": "v", "resourceVersion": "5", "finalizers": ["x"]}}
    vms.remove_finalizer(vm)
    vms.patch_status(vm, {"accel": "kvm"})
    base = "/apis/edgevirt.io/v1alpha1/namespaces/n%20s/virtualmachines/v"
    assert [(s["method"], s["path"], s["type"], s["body"]) for s in apiserver.seen] == [
        ("PATCH", base, MERGE_PATCH, {"metadata": {"finalizers": ["x"], "resourceVersion": "5"}}),
        ("PATCH", base + "/status", MERGE_PATCH, {"status": {"accel": "kvm"}}),
    ]


def test_runner_retries_a_thin_client_conflict_soon() -> None:
    from vmcrd.kube import WorkQueue

    q = WorkQueue()
    delays = RetryDelays(conflict=0.01, api_error=0.02, error=0.03)
    errors = iter([ApiError(409, "Conflict"), ApiError(500, "Internal Server Error")])

    def reconcile(key: str) -> float | None:
        raise next(errors)

    inf = Informer("vms", RestListWatch(KubeHttpClient(ClusterAccess("http://127.0.0.1:1")), "/x"), q.add)
    inf.synced.set()
    runner = Runner("r", q, [inf], reconcile, resync=60, delays=delays)
    results: list[str] = []
    runner.observe = lambda _s, result: results.append(result)
    runner._process("ns/a")
    runner._process("ns/a")
    assert results == ["conflict", "api_error"]


# ------------------------------------------------------------------------------------ TLS
@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A throwaway CA with a server certificate for 127.0.0.1 and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a throwaway CA")
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=test-ca")
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (d / f"{name}.ext").write_text(ext + "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=edgevirt-{name}")
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext",
        )  # fmt: skip
    return d


@pytest.fixture
def tls_apiserver(pki: Path) -> Iterator[FakeApiServer]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
    ctx.load_verify_locations(pki / "ca.crt")
    ctx.verify_mode = ssl.CERT_OPTIONAL
    fake = FakeApiServer(tls=ctx)
    try:
        yield fake
    finally:
        fake.close()


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_tls_with_ca_and_client_certificate_data_from_a_kubeconfig(
    tls_apiserver: FakeApiServer, pki: Path, tmp_path: Path
) -> None:
    kubeconfig = write(
        tmp_path / "config",
        textwrap.dedent(f"""\
            clusters: [{{name: c, cluster: {{server: "{tls_apiserver.url}",
                         certificate-authority-data: {b64(pki / "ca.crt")}}}}}]
            users: [{{name: u, user: {{client-certificate-data: {b64(pki / "client.crt")},
                      client-key-data: {b64(pki / "client.key")}}}}}]
            contexts: [{{name: x, context: {{cluster: c, user: u}}}}]
            current-context: x
            """),
    )
    tls_apiserver.answers.append((200, {"major": "1"}))
    assert KubeHttpClient(load_kubeconfig(kubeconfig)).request("GET", "/version") == {"major": "1"}
    assert tls_apiserver.seen[0]["peer"] == {"commonName": "edgevirt-client"}
    assert list(tmp_path.iterdir()) == [tmp_path / "config"]  # the key's temporary copy is gone


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_tls_with_files_and_without_the_ca(tls_apiserver: FakeApiServer, pki: Path) -> None:
    files = {"cert_file": str(pki / "client.crt"), "key_file": str(pki / "client.key")}
    tls_apiserver.answers += [(200, {}), (200, {})]
    client_of(tls_apiserver, ca_file=str(pki / "ca.crt"), **files).request("GET", "/version")
    client_of(tls_apiserver, insecure=True).request("GET", "/version")
    assert [s["peer"] for s in tls_apiserver.seen] == [{"commonName": "edgevirt-client"}, None]
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):  # the system's CAs do not know it
        client_of(tls_apiserver).request("GET", "/version", timeout=5)


# ------------------------------------------------------------------------------------ node mode stays lean
NODE_MODE = """
import json, pathlib, sys, tempfile
d = pathlib.Path(tempfile.mkdtemp())
(d / "config").write_text('''
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u}}]
current-context: x
''')
(d / "bad").write_text("clusters: []\\n")
import vmcrd.cli, vmcrd.node, vmcrd.ops
from cri_shim.kube_http import client_from_config
kube = client_from_config(str(d / "config"))
ctl = vmcrd.node.NodeController(kube, "n", state_dir=d)
vmcrd.ops.instrument("node", ctl.runner, vm_filter=ctl.mine)
rc = vmcrd.cli.main(["--mode", "node", "--node", "n", "--kubeconfig", str(d / "bad"), "--ops-address", ""])
print(json.dumps({"rc": rc, "kubernetes": sorted(m for m in sys.modules if m.split(".")[0] == "kubernetes")}))
"""


def test_node_mode_never_imports_the_kubernetes_client() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", NODE_MODE], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1]) == {"rc": 2, "kubernetes": []}
    assert "current-context is not set" in res.stderr  # run_node's kubeconfig error, with the fix


def test_cluster_modes_api_client_speaks_the_same_protocol(apiserver: FakeApiServer) -> None:
    from kubernetes import client

    from cri_shim.kube_rest import ApiClientKubeApi

    cfg = client.Configuration()
    cfg.host = apiserver.url
    cfg.api_key = {"BearerToken": "Bearer sekret"}
    kube = ApiClientKubeApi(client.ApiClient(cfg))
    apiserver.answers += [Stream(['{"n": 1}', '{"n": 2}']), (404, {"message": "nope"}), (200, {"ok": 1})]
    assert list(kube.stream_lines("/w", query={"watch": "true"}, timeout=(5, 10))) == ['{"n": 1}', '{"n": 2}']
    with pytest.raises(ApiError) as err:  # the client's ApiException, as the protocol's error
        kube.request("GET", "/x")
    assert (err.value.status, json.loads(err.value.body or "")["message"]) == (404, "nope")
    assert kube.request("GET", "/y") == {"ok": 1}
    assert [(s["path"], s["auth"]) for s in apiserver.seen] == [
        ("/w?watch=true", "Bearer sekret"),
        ("/x", "Bearer sekret"),
        ("/y", "Bearer sekret"),
    ]
