"""https image downloads: only https after redirects (no downgrade, no file:/ftp: behind a redirect),
a bounded number of redirects, a size cap enforced while streaming, an overall deadline, and error
texts without digests. A plain-http server on loopback stands in (``allow_http``: the https-only
rules are checked on the redirect handler itself and, over TLS, in tests/integration)."""

from __future__ import annotations

import http.server
import io
import threading
import time
import urllib.error
import urllib.request

import pytest

from cri_shim.vm import ImageError
from cri_shim.vm.https_fetch import MAX_REDIRECTS, _HttpsOnlyRedirects, download, opener

pytestmark = pytest.mark.timeout(60)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *a):
        pass

    def do_GET(self):
        if self.path.startswith("/hop/"):  # /hop/<n>: redirect n more times, then /small
            n = int(self.path.split("/")[2])
            self.send_response(302)
            self.send_header("Location", f"/hop/{n - 1}" if n > 1 else "/small")
            self.end_headers()
            return
        body = {"/small": b"x" * 100, "/big": b"x" * 5000}.get(self.path)
        self.send_response(200)
        if self.path == "/nolength":  # more than the cap, without announcing it
            self.end_headers()
            self.wfile.write(b"y" * 5000)
            return
        if self.path == "/slow":
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"z")
                self.wfile.flush()
                time.sleep(0.1)
            return
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def get(url: str, max_bytes: int = 1000, timeout: float = 20) -> bytes:
    out = io.BytesIO()
    download(url, out, op=opener(None, allow_http=True), max_bytes=max_bytes, timeout=timeout)
    return out.getvalue()


def test_a_download_within_the_cap_and_a_few_redirects(server):
    assert get(f"{server}/small") == b"x" * 100
    assert get(f"{server}/hop/{MAX_REDIRECTS}") == b"x" * 100


def test_too_many_redirects_are_refused(server):
    with pytest.raises(ImageError, match=r"answered 302"):
        get(f"{server}/hop/{MAX_REDIRECTS + 1}")


@pytest.mark.parametrize("path", ["/big", "/nolength"])
def test_the_size_cap_holds_announced_or_not(server, path):
    with pytest.raises(
        ImageError, match=r"over this node's limit of 1000 per image \(kvm option max_image_bytes\)"
    ):
        get(f"{server}{path}")


def test_the_whole_download_has_a_deadline(server):
    with pytest.raises(ImageError, match=r"the download took over 1s \(kvm option image_fetch_timeout_s\)"):
        get(f"{server}/slow", timeout=1)


@pytest.mark.parametrize(
    "target", ["http://mirror.example/x.img", "file:///etc/shadow", "ftp://mirror.example/x.img", "data:,x"]
)
def test_a_redirect_may_only_lead_to_https(target):
    req = urllib.request.Request("https://images.example/x.img")
    handler = _HttpsOnlyRedirects(allow_http=False)
    with pytest.raises(ImageError, match=r"redirected the download away from https") as ei:
        handler.redirect_request(req, io.BytesIO(), 302, "Found", {}, target)
    assert target in ei.value.detail
    new = handler.redirect_request(req, io.BytesIO(), 302, "Found", {}, "https://cdn.example/x.img")
    assert new is not None and new.full_url == "https://cdn.example/x.img"


def test_the_opener_speaks_nothing_but_https():
    op = opener(None)
    for url in ("file:///etc/hostname", "ftp://127.0.0.1/x", "http://127.0.0.1:9/x"):
        with pytest.raises(urllib.error.URLError, match="unknown url type"):
            op.open(url, timeout=5)
