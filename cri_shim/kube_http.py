"""A minimal Kubernetes API client on urllib3: where the API server is and how to prove who we are
(a kubeconfig, or a pod's service account), and plain JSON calls and watches (:class:`KubeHttpClient`,
a :class:`~cri_shim.kube_rest.KubeApi`).

Why: importing the kubernetes client costs ~30 MiB of resident memory (pydantic, oauthlib, requests,
its generated models), a third of what edgevirt-controller's node mode needs on a small edge node;
node mode makes a handful of JSON calls that need none of it.

What a kubeconfig may say (:func:`load_kubeconfig`): a cluster's ``server``, ``certificate-authority``
(-``data``), ``insecure-skip-tls-verify`` and ``tls-server-name``; a user's ``token``, ``tokenFile``,
``client-certificate`` (-``data``) and ``client-key`` (-``data``), or ``username`` and ``password``.
Credential plugins (``exec``, ``auth-provider``) and ``proxy-url`` are refused with a message that
names the field. ``$KUBECONFIG`` may list several files (merged as kubectl does: the first of each
name wins); relative paths in a file are relative to its folder. In a pod (:func:`load_in_cluster`)
the service account's token is read again whenever its file changes (kubelet rotates bound tokens).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import ssl
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import urllib3

from .kube_rest import JSON, ApiError, Timeout, lines_of

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_KUBECONFIG = Path("~/.kube/config")
USER_AGENT = "edgevirt"
#: Connections kept open to the API server (a watch holds one while it runs).
POOL_SIZE = 4
STREAM_CHUNK = 64 * 1024


class KubeConfigError(ValueError):
    """The kubeconfig or the in-cluster config cannot be used; the message names the field and the fix."""


@dataclass(frozen=True)
class ClusterAccess:
    """Where the API server is and the credentials for it (what a kubeconfig context resolves to)."""

    server: str
    ca_file: str | None = None
    ca_data: str | None = None  # PEM
    insecure: bool = False
    tls_server_name: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    cert_data: bytes | None = None  # PEM
    key_data: bytes | None = None  # PEM
    token: str | None = None
    token_file: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------------ kubeconfig
def kubeconfig_paths(explicit: str | None = None, environ: Mapping[str, str] = os.environ) -> list[Path]:
    """The kubeconfig files to read: ``explicit`` (must exist), else the existing ones of $KUBECONFIG,
    else ~/.kube/config if it exists; [] when there is none."""
    if explicit:
        return [Path(explicit)]
    listed = [Path(p) for p in environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    if listed:
        return [p for p in listed if p.is_file()]
    home = DEFAULT_KUBECONFIG.expanduser()
    return [home] if home.is_file() else []


def load_kubeconfig(path: str | None = None, context: str | None = None) -> ClusterAccess:
    """The cluster and credentials of ``context`` (default: current-context) in the kubeconfig at
    ``path`` (default: $KUBECONFIG, else ~/.kube/config)."""
    paths = kubeconfig_paths(path)
    if not paths:
        raise KubeConfigError(
            "no kubeconfig: $KUBECONFIG names no existing file and ~/.kube/config does not exist: "
            "pass --kubeconfig FILE"
        )
    where = ", ".join(str(p) for p in paths)
    merged = merge_kubeconfigs([read_kubeconfig(p) for p in paths])
    return resolve_context(merged, context, where)


def read_kubeconfig(path: Path) -> dict[str, Any]:
    """One kubeconfig file as a dict, its relative file paths made absolute (relative to its folder)."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise KubeConfigError(
            f"kubeconfig {path}: no such file: pass an existing file to --kubeconfig"
        ) from None
    except OSError as e:
        raise KubeConfigError(
            f"kubeconfig {path}: cannot read it ({e.strerror}): fix its permissions"
        ) from None
    except yaml.YAMLError as e:
        raise KubeConfigError(
            f"kubeconfig {path}: not YAML ({yaml_problem(e)}): fix the file or pass another one"
        ) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise KubeConfigError(
            f"kubeconfig {path}: not a mapping of clusters, users and contexts: fix the file"
        )
    return absolute_paths(doc, path.parent)


def yaml_problem(e: Exception) -> str:
    """A YAML error on one line: where, and what."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(e, "problem", None) or e).replace("\n", " ")


#: The fields that name files, by section; a relative path is relative to the kubeconfig's folder.
PATH_FIELDS = {
    "clusters": ("cluster", ("certificate-authority",)),
    "users": ("user", ("client-certificate", "client-key", "tokenFile")),
}


def absolute_paths(doc: dict[str, Any], base: Path) -> dict[str, Any]:
    for section, (inner, names) in PATH_FIELDS.items():
        for entry in doc.get(section) or []:
            body = entry.get(inner) if isinstance(entry, dict) else None
            if not isinstance(body, dict):
                continue
            for name in names:
                value = body.get(name)
                if isinstance(value, str) and value and not os.path.isabs(value):
                    body[name] = str(base / value)
    return doc


def merge_kubeconfigs(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several kubeconfigs as one, as kubectl merges $KUBECONFIG: the first entry of each name and
    the first current-context win."""
    merged: dict[str, Any] = {"clusters": [], "users": [], "contexts": [], "current-context": ""}
    for doc in docs:
        for section in ("clusters", "users", "contexts"):
            have = {e.get("name") for e in merged[section]}
            for entry in doc.get(section) or []:
                if isinstance(entry, dict) and entry.get("name") not in have:
                    merged[section].append(entry)
        merged["current-context"] = merged["current-context"] or doc.get("current-context") or ""
    return merged


def named(doc: dict[str, Any], section: str, name: str) -> dict[str, Any] | None:
    """The entry ``name`` of ``section`` (clusters, users, contexts), or None."""
    return next((e for e in doc.get(section) or [] if e.get("name") == name), None)


def resolve_context(doc: dict[str, Any], context: str | None, where: str) -> ClusterAccess:
    """The ClusterAccess of ``context`` (default: current-context) of a merged kubeconfig."""
    name = context or doc.get("current-context")
    if not name:
        raise KubeConfigError(
            f"kubeconfig {where}: current-context is not set: set it (kubectl config use-context NAME)"
        )
    ctx = named(doc, "contexts", name)
    if ctx is None:
        there = ", ".join(str(c.get("name")) for c in doc["contexts"]) or "none"
        raise KubeConfigError(
            f'kubeconfig {where}: context "{name}" is not in contexts (there: {there}): '
            "use one of those or fix current-context"
        )
    spec = section_body(ctx, "context", where)
    cluster = referenced(doc, "clusters", spec.get("cluster"), name, where)
    if cluster is None:
        raise KubeConfigError(
            f'kubeconfig {where}: context "{name}" names no cluster: set contexts[{name}].context.cluster'
        )
    user = referenced(doc, "users", spec.get("user"), name, where)
    return ClusterAccess(**cluster_fields(cluster, where), **user_fields(user, where))


def section_body(entry: dict[str, Any], inner: str, where: str) -> dict[str, Any]:
    body = entry.get(inner) or {}
    if not isinstance(body, dict):
        raise KubeConfigError(
            f"kubeconfig {where}: {inner} {entry.get('name')!r} is not a mapping: fix its `{inner}:` field"
        )
    return body


def referenced(
    doc: dict[str, Any], section: str, name: str | None, context: str, where: str
) -> dict[str, Any] | None:
    """The cluster or user a context names (None when it names none)."""
    if not name:
        return None
    entry = named(doc, section, name)
    if entry is None:
        kind = section[:-1]
        raise KubeConfigError(
            f'kubeconfig {where}: context "{context}" names {kind} "{name}", which is not in {section}: '
            f"add it or fix contexts[{context}].context.{kind}"
        )
    return entry


def cluster_fields(entry: dict[str, Any], where: str) -> dict[str, Any]:
    body = section_body(entry, "cluster", where)
    label = f"kubeconfig {where}: clusters[{entry.get('name')}].cluster"
    if body.get("proxy-url"):
        raise KubeConfigError(f"{label}.proxy-url is not supported: reach the API server directly")
    server = body.get("server")
    if not server:
        raise KubeConfigError(
            f"{label}.server is not set: set it to the API server's URL (https://HOST:PORT)"
        )
    ca_data = body.get("certificate-authority-data")
    ca_pem = decode_base64(ca_data, f"{label}.certificate-authority-data").decode() if ca_data else None
    return {
        "server": str(server).rstrip("/"),
        "ca_file": body.get("certificate-authority") or None,
        "ca_data": ca_pem,
        "insecure": bool(body.get("insecure-skip-tls-verify")),
        "tls_server_name": body.get("tls-server-name") or None,
    }


def user_fields(entry: dict[str, Any] | None, where: str) -> dict[str, Any]:
    if entry is None:
        return {}  # anonymous
    body = section_body(entry, "user", where)
    label = f"kubeconfig {where}: users[{entry.get('name')}].user"
    for plugin in ("exec", "auth-provider"):
        if plugin in body:
            raise KubeConfigError(
                f"{label}.{plugin} (a credential plugin) is not supported by edgevirt: "
                "give the user a token, tokenFile or client-certificate and client-key"
            )
    cert = body.get("client-certificate-data")
    key = body.get("client-key-data")
    fields: dict[str, Any] = {
        "cert_file": body.get("client-certificate") or None,
        "key_file": body.get("client-key") or None,
        "cert_data": decode_base64(cert, f"{label}.client-certificate-data") if cert else None,
        "key_data": decode_base64(key, f"{label}.client-key-data") if key else None,
        "token": body.get("token") or None,
        "token_file": body.get("tokenFile") or None,
        "username": body.get("username") or None,
        "password": body.get("password") or None,
    }
    has_cert = bool(fields["cert_file"] or fields["cert_data"])
    has_key = bool(fields["key_file"] or fields["key_data"])
    if has_cert != has_key:
        missing = "client-key" if has_cert else "client-certificate"
        raise KubeConfigError(f"{label}.{missing}(-data) is not set: a client certificate needs both")
    return fields


def decode_base64(value: Any, label: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise KubeConfigError(f"{label} is not base64: put the base64 of the PEM file there") from None


# ------------------------------------------------------------------------------------ in cluster
def load_in_cluster(
    environ: Mapping[str, str] = os.environ, account_dir: Path = SERVICE_ACCOUNT_DIR
) -> ClusterAccess:
    """The API server and credentials of the pod we run in: $KUBERNETES_SERVICE_HOST and _PORT, the
    service account's token (re-read when it changes) and CA certificate."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise KubeConfigError(
            "not in a pod: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set: "
            "pass --kubeconfig FILE (or set $KUBECONFIG)"
        )
    token = account_dir / "token"
    if not token.is_file():
        raise KubeConfigError(
            f"in-cluster config: no service account token at {token}: "
            "set automountServiceAccountToken: true on the pod or its ServiceAccount"
        )
    ca = account_dir / "ca.crt"
    bracketed = f"[{host}]" if ":" in host else host
    return ClusterAccess(
        server=f"https://{bracketed}:{port}",
        ca_file=str(ca) if ca.is_file() else None,
        token_file=str(token),
    )


def load_config(
    kubeconfig: str | None = None, context: str | None = None, in_cluster: bool = True
) -> ClusterAccess:
    """``kubeconfig`` (or $KUBECONFIG / ~/.kube/config) and its ``context``; when there is no
    kubeconfig at all and ``in_cluster``, the pod's service account. A kubeconfig that exists but
    cannot be used is an error (not a reason to try the service account)."""
    if kubeconfig or context or kubeconfig_paths() or not in_cluster:
        return load_kubeconfig(kubeconfig, context)
    return load_in_cluster()


# ------------------------------------------------------------------------------------ credentials
class TokenFile:
    """A bearer token kept in a file, read again whenever the file changes (kubelet replaces a bound
    service account token before it expires; a tokenFile may be rotated the same way)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._token = ""

    def current(self) -> str:
        st = os.stat(self.path)  # follows kubelet's ..data symlink: a new token is a new inode
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            with open(self.path) as f:
                self._token = f.read().strip()
            self._seen = seen
        return self._token


def tls_context(access: ClusterAccess) -> ssl.SSLContext:
    """The TLS settings of ``access``: its CA (else the system's), its client certificate, or no
    verification at all when ``insecure``."""
    ctx = ssl.create_default_context(cafile=access.ca_file, cadata=access.ca_data)
    if access.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if access.cert_file or access.cert_data:
        load_client_certificate(ctx, access)
    return ctx


def load_client_certificate(ctx: ssl.SSLContext, access: ClusterAccess) -> None:
    """The client certificate and key, from their files or their data (Python's ssl loads them from
    files only: the data goes through a private temporary folder, removed at once)."""
    if not (access.cert_data or access.key_data):
        ctx.load_cert_chain(str(access.cert_file), access.key_file)
        return
    with tempfile.TemporaryDirectory(prefix="edgevirt-kube-") as tmp:
        cert = access.cert_file or _write_private(Path(tmp) / "cert.pem", access.cert_data)
        key = access.key_file or _write_private(Path(tmp) / "key.pem", access.key_data)
        ctx.load_cert_chain(cert, key)


def _write_private(path: Path, data: bytes | None) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data or b"")
    return str(path)


# ------------------------------------------------------------------------------------ the client
def as_timeout(timeout: Timeout) -> urllib3.Timeout:
    """One number: the whole call's limit; a pair: (connect, read); None: no limit."""
    if isinstance(timeout, tuple):
        return urllib3.Timeout(connect=timeout[0], read=timeout[1])
    return urllib3.Timeout(total=timeout)


class KubeHttpClient:
    """A :class:`~cri_shim.kube_rest.KubeApi` over urllib3 with the server and credentials of a
    :class:`ClusterAccess`; raises :class:`~cri_shim.kube_rest.ApiError` for an error answer."""

    def __init__(self, access: ClusterAccess, pool_size: int = POOL_SIZE) -> None:
        self.access = access
        self.server = access.server.rstrip("/")
        self._token_file = TokenFile(access.token_file) if access.token_file and not access.token else None
        pool_kw: dict[str, Any] = {
            "maxsize": pool_size,
            "retries": urllib3.Retry(total=2, read=0, redirect=0),
        }
        if self.server.startswith("https:"):
            pool_kw["ssl_context"] = tls_context(access)
            if access.tls_server_name:
                pool_kw["server_hostname"] = access.tls_server_name
        self.pool = urllib3.PoolManager(**pool_kw)

    def headers(self, content_type: str | None = None) -> dict[str, str]:
        """Accept JSON, our user agent, the credentials (a rotated token file read again)."""
        out = {"Accept": JSON, "User-Agent": USER_AGENT}
        if content_type:
            out["Content-Type"] = content_type
        token = self._token_file.current() if self._token_file else self.access.token
        if token:
            out["Authorization"] = f"Bearer {token}"
        elif self.access.username is not None:
            basic = f"{self.access.username}:{self.access.password or ''}".encode()
            out["Authorization"] = "Basic " + base64.b64encode(basic).decode()
        return out

    def url(self, path: str, query: Mapping[str, str] | None = None) -> str:
        return self.server + path + (f"?{urlencode(query)}" if query else "")

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, str] | None = None,
        content_type: str = JSON,
        timeout: Timeout = 30,
    ) -> Any:
        """:meth:`KubeApi.request <cri_shim.kube_rest.KubeApi.request>`."""
        resp = self.pool.request(
            method,
            self.url(path, query),
            body=None if body is None else json.dumps(body).encode(),
            headers=self.headers(content_type if body is not None else None),
            timeout=as_timeout(timeout),
        )
        check_status(resp.status, resp.reason, resp.data)
        return json.loads(resp.data) if resp.data else None

    def stream_lines(
        self, path: str, *, query: Mapping[str, str] | None = None, timeout: Timeout = None
    ) -> Iterator[str]:
        """:meth:`KubeApi.stream_lines <cri_shim.kube_rest.KubeApi.stream_lines>`."""
        resp = self.pool.request(
            "GET",
            self.url(path, query),
            headers=self.headers(),
            timeout=as_timeout(timeout),
            preload_content=False,
        )
        try:
            if not 200 <= resp.status <= 299:
                check_status(resp.status, resp.reason, resp.read())
            yield from lines_of(resp.stream(STREAM_CHUNK))
        finally:
            resp.close()  # a watch cut short leaves unread data: the connection is not reused
            resp.release_conn()

    def close(self) -> None:
        self.pool.clear()


def check_status(status: int, reason: str | None, data: bytes | None) -> None:
    """Raise :class:`ApiError` unless ``status`` is 2xx."""
    if not 200 <= status <= 299:
        raise ApiError(status, reason or "", data.decode("utf-8", "replace") if data else None)


def client_from_config(
    kubeconfig: str | None = None, context: str | None = None, in_cluster: bool = True
) -> KubeHttpClient:
    """A client for :func:`load_config`'s choice of kubeconfig or in-cluster config."""
    return KubeHttpClient(load_config(kubeconfig, context, in_cluster))
