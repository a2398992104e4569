"""Downloads of ``https://...#sha256=`` images: https only, bounded in size and time.

* Only https, also after a redirect: a redirect to ``http://`` (a downgrade) or any other scheme is
  refused, and at most :data:`MAX_REDIRECTS` are followed. Only the https handler is installed
  (no ``file:``, ``ftp:`` or ``data:`` opener behind a redirect).
* At most ``max_bytes``: refused up front when the server announces more (``Content-Length``), and
  cut off while streaming when it sends more than it announced.
* A deadline for the whole download (connect, redirects, every read), besides the per-read timeout.
* Hashed while streaming; the caller keeps the file only when the digest matches. Error messages
  never carry the digest of what was received (it would tell a user the hash of content the node
  can reach and they cannot).
"""

from __future__ import annotations

import hashlib
import http.client
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import IO, Any

from .errors import ImageError
from .sizes import format_bytes

MAX_REDIRECTS = 5
CHUNK = 1 << 20
Progress = Callable[[int, int | None], None]


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def __init__(self, allow_http: bool) -> None:
        self.allow_http = allow_http

    def redirect_request(
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        schemes = ("https://", "http://") if self.allow_http else ("https://",)
        if not newurl.lower().startswith(schemes):
            raise ImageError(
                "the image server redirected the download away from https; the kvm handler follows "
                "https redirects only",
                detail=f"{req.full_url} -> {newurl}",
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def opener(ssl_context: ssl.SSLContext | None, allow_http: bool = False) -> urllib.request.OpenerDirector:
    """An opener that speaks https only (http too with ``allow_http``: tests), follows https
    redirects, and honours the environment's https proxy."""
    op = urllib.request.OpenerDirector()
    handlers: list[urllib.request.BaseHandler] = [
        urllib.request.ProxyHandler(),
        urllib.request.HTTPSHandler(context=ssl_context),
        _HttpsOnlyRedirects(allow_http),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ]
    if allow_http:
        handlers.append(urllib.request.HTTPHandler())
    for h in handlers:
        op.add_handler(h)
    return op


def _too_big(max_bytes: int) -> ImageError:
    return ImageError(
        f"the image is over this node's limit of {format_bytes(max_bytes)} per image "
        "(kvm option max_image_bytes)"
    )


def _late(timeout: float) -> ImageError:
    return ImageError(f"the download took over {int(timeout)}s (kvm option image_fetch_timeout_s)")


def download(
    url: str,
    dst: IO[bytes],
    *,
    op: urllib.request.OpenerDirector,
    max_bytes: int,
    timeout: float,
    read_timeout: float = 60.0,
    progress: Progress | None = None,
) -> str:
    """Stream ``url`` into ``dst``; returns the sha256 hex digest of what was written."""
    deadline = time.monotonic() + timeout
    req = urllib.request.Request(url, headers={"User-Agent": "edgevirt-image-store"})
    try:
        with op.open(req, timeout=min(read_timeout, timeout)) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if total is not None and total > max_bytes:
                raise _too_big(max_bytes)
            h, done = hashlib.sha256(), 0
            while chunk := resp.read1(CHUNK):
                done += len(chunk)
                if done > max_bytes:
                    raise _too_big(max_bytes)
                if time.monotonic() > deadline:
                    raise _late(timeout)
                h.update(chunk)
                dst.write(chunk)
                if progress:
                    progress(done, total)
            return h.hexdigest()
    except urllib.error.HTTPError as e:
        raise ImageError(f"the image server answered {e.code} {e.reason}", detail=url) from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ImageError):
            raise e.reason from None
        raise ImageError("the image server cannot be reached", detail=f"{url}: {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:
        if time.monotonic() > deadline:
            raise _late(timeout) from None
        raise ImageError("the download broke off", detail=f"{url}: {e}") from None
