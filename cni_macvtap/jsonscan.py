"""One top-level string member of a JSON object, found without the json module.

The thin client needs only ``daemonSocket`` before it hands the call on, and ``import json`` (which
imports re) would cost it several milliseconds. Strings, escapes and nesting are followed, so a key
inside a nested object or inside a string is never taken for the top-level one; whatever the scan is
not sure about (escapes, duplicates, a non-string value, broken JSON) raises Unsure, and the caller
asks the real parser. deploy/cni/macvtap-client.c implements the same scan.
"""

from __future__ import annotations

_WS = b" \t\r\n"
_QUOTE, _BACKSLASH, _COLON = 0x22, 0x5C, 0x3A
_CLOSER = {ord("{"): ord("}"), ord("["): ord("]")}


class Unsure(Exception):
    """Only a full JSON parser can answer for this document."""


def _skip_ws(doc: bytes, i: int) -> int:
    while i < len(doc) and doc[i] in _WS:
        i += 1
    return i


def _string_end(doc: bytes, start: int) -> int:
    """Index of the quote closing the string whose opening quote is at start."""
    i = start
    while True:
        i = doc.find(b'"', i + 1)
        if i < 0:
            raise Unsure("unterminated string")
        backslashes = 0
        while doc[i - 1 - backslashes] == _BACKSLASH:
            backslashes += 1
        if backslashes % 2 == 0:
            return i


def top_level_string(doc: bytes, key: bytes) -> bytes | None:
    """The raw value of the top-level member key when it is a string without escapes; None when the
    object has no such member; Unsure otherwise."""
    i = _skip_ws(doc, 0)
    if i >= len(doc) or doc[i] != ord("{"):
        raise Unsure("not an object")
    stack: list[int] = []
    found = None
    while i < len(doc):
        c = doc[i]
        if c == _QUOTE:
            end = _string_end(doc, i)
            after = _skip_ws(doc, end + 1)
            if len(stack) == 1 and after < len(doc) and doc[after] == _COLON:
                name = doc[i + 1 : end]
                if b"\\" in name:
                    raise Unsure("escaped key")
                if name == key:
                    if found is not None:
                        raise Unsure("duplicate key")
                    found, after = _value(doc, _skip_ws(doc, after + 1))
            i = after
            continue
        if c in _CLOSER:
            stack.append(_CLOSER[c])
        elif c in (0x5D, 0x7D):  # ] }
            if not stack or stack.pop() != c:
                raise Unsure("mismatched brackets")
            if not stack:
                if _skip_ws(doc, i + 1) != len(doc):
                    raise Unsure("data after the object")
                return found
        i += 1
    raise Unsure("unterminated object")


def _value(doc: bytes, i: int) -> tuple[bytes, int]:
    if i >= len(doc) or doc[i] != _QUOTE:
        raise Unsure("not a string value")
    end = _string_end(doc, i)
    raw = doc[i + 1 : end]
    if b"\\" in raw:
        raise Unsure("escaped value")
    return raw, end + 1
