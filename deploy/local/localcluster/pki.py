"""Certificates and keys of the local cluster, made once with the openssl command line: a cluster CA,
the API server's serving certificate, client certificates per component, the service-account key."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .paths import Paths, node_name

DAYS = "3650"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _client(pki: Path, name: str, subject: str, ca: Path, cakey: Path, sans: str | None = None) -> None:
    crt, key = pki / f"{name}.crt", pki / f"{name}.key"
    if crt.exists() and key.exists():
        return
    csr = pki / f"{name}.csr"
    ext = pki / f"{name}.ext"
    lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]
    lines.append("extendedKeyUsage=serverAuth" if sans else "extendedKeyUsage=clientAuth")
    if sans:
        lines.append(f"subjectAltName={sans}")
    ext.write_text("\n".join(lines) + "\n")
    _openssl("genrsa", "-out", str(key), "2048")
    _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr))
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(cakey),
        "-CAcreateserial",
        "-days",
        DAYS,
        "-sha256",
        "-extfile",
        str(ext),
        "-out",
        str(crt),
    )
    csr.unlink()
    ext.unlink()
    key.chmod(0o600)


def ensure(paths: Paths) -> None:
    """Create whatever of the PKI is missing; existing files are kept (generated once)."""
    pki = paths.pki
    pki.mkdir(parents=True, exist_ok=True)
    pki.chmod(0o700)
    ca, cakey = pki / "ca.crt", pki / "ca.key"
    if not (ca.exists() and cakey.exists()):
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(cakey),
            "-out",
            str(ca),
            "-days",
            DAYS,
            "-subj",
            "/CN=edgevirt-local-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        )
    if not (pki / "sa.key").exists():
        _openssl("genrsa", "-out", str(pki / "sa.key"), "2048")
        _openssl("rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))
    _client(
        pki,
        "apiserver",
        "/CN=kube-apiserver",
        ca,
        cakey,
        sans="IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local",
    )
    _client(pki, "admin", "/O=system:masters/CN=kubernetes-admin", ca, cakey)
    _client(pki, "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client", ca, cakey)
    _client(pki, "controller-manager", "/CN=system:kube-controller-manager", ca, cakey)
    _client(pki, "scheduler", "/CN=system:kube-scheduler", ca, cakey)
    kubelet_certs(pki, ca, cakey, node_name(), "127.0.0.1")


def kubelet_certs(pki: Path, ca: Path, cakey: Path, node: str, address: str) -> None:
    """A node's kubelet certificates in `pki`: its client one (the Node authorizer's
    system:node:<name>) and its serving one, for its name and the address it serves on."""
    _client(pki, "kubelet", f"/O=system:nodes/CN=system:node:{node}", ca, cakey)
    extra = ",DNS:localhost" if address == "127.0.0.1" else ""
    _client(
        pki,
        "kubelet-serving",
        f"/O=system:nodes/CN=system:node:{node}",
        ca,
        cakey,
        sans=f"IP:{address}{extra},DNS:{node}",
    )


def kubeconfig(paths: Paths, user: str, out: Path) -> None:
    """Write a kubeconfig for the client certificate `user` (embedded, so the file stands alone)."""
    import base64

    def b64(p: Path) -> str:
        return base64.b64encode(p.read_bytes()).decode()

    pki = paths.pki
    text = f"""apiVersion: v1
kind: Config
clusters:
- name: edgevirt-local
  cluster:
    server: https://127.0.0.1:6443
    certificate-authority-data: {b64(pki / "ca.crt")}
users:
- name: {user}
  user:
    client-certificate-data: {b64(pki / f"{user}.crt")}
    client-key-data: {b64(pki / f"{user}.key")}
contexts:
- name: edgevirt-local
  context: {{cluster: edgevirt-local, user: {user}, namespace: default}}
current-context: edgevirt-local
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    tmp.replace(out)
