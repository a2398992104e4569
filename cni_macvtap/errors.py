"""CNI error codes and the error type every verb raises (stdlib only: used by the thin client)."""

from __future__ import annotations

# Well-known codes from the CNI SPEC.md ("Error" section).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN = 11
NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51

# Plugin-specific codes (the spec reserves >= 100 for them).
LINK_FAILURE = 100
IPAM_FAILURE = 101
DEVICE_NODE_FAILURE = 102
CHECK_FAILED = 103
INTERNAL_ERROR = 999

LATEST_VERSION = "1.1.0"


class CNIError(Exception):
    """A failure that is reported to the runtime as the spec's error JSON."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str | None = None) -> bytes:
        """The error object as printed on stdout (cniVersion falls back to the latest we speak)."""
        import json  # lazily: the thin client never needs it on success

        doc: dict[str, object] = {
            "cniVersion": cni_version or LATEST_VERSION,
            "code": self.code,
            "msg": self.msg,
        }
        if self.details:
            doc["details"] = self.details
        return (json.dumps(doc, indent=4) + "\n").encode()
