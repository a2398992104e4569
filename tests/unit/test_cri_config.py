"""edgevirt-cri's config file: defaults, the example config in deploy/cri, and errors that name the
field and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from cri_shim import config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_serve_containerd_handlers():
    cfg = config.load(None)
    assert cfg.socket == "/run/edgevirt/cri.sock" and cfg.socket_mode == 0o660
    assert cfg.handlers == {"": "containerd", "runc": "containerd", "kata": "containerd"}
    assert cfg.backends["containerd"].socket == "/run/containerd/containerd.sock"


def test_the_example_config_is_valid():
    cfg = config.load(REPO / "deploy" / "cri" / "edgevirt-cri.yaml")
    assert cfg.handlers[""] == "containerd"
    assert "kvm" in cfg.handlers and cfg.backends["kvm"].type == "plugin"


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ("socket_mode: rwx", "socket_mode"),
        ("bogus: 1", "unknown key(s) ['bogus']"),
        ("backends: {c: {type: docker}}\nhandlers: {'': c}", "backends.c.type"),
        ("backends: {c: {type: containerd}}\nhandlers: {'': nope}", "backend 'nope' is not defined"),
        ("backends: {c: {type: containerd}}\nhandlers: {runc: c}", 'default handler ""'),
        ("backends: {k: {type: plugin, factory: nomodule}}\nhandlers: {'': k}", "backends.k.factory"),
        ("workers: 1", "workers"),
        ("backends: {c: {type: containerd, timeout: soon}}\nhandlers: {'': c}", "backends.c.timeout"),
        ("backends: {c: {type: containerd, timeout: -1}}\nhandlers: {'': c}", "positive number of seconds"),
        ("[1, 2]", "top level must be a mapping"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, doc, needle):
    p = tmp_path / "c.yaml"
    p.write_text(doc)
    with pytest.raises(config.ConfigError) as e:
        config.load(p)
    assert needle in str(e.value)
    assert str(p) in str(e.value)


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(config.ConfigError, match="cannot read config file"):
        config.load(tmp_path / "absent.yaml")
