"""The on-disk ID -> backend index of edgevirt-cri: records survive a new IdIndex over the same
directory, removal of a sandbox drops its containers, temporary files of an interrupted write are
ignored, and IDs that are not plain identifiers are refused (they would escape the directory)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cri_shim.state import IdIndex


def test_records_survive_a_restart(tmp_path):
    idx = IdIndex(tmp_path)
    idx.add_sandbox("s1", "kvm")
    idx.add_container("c1", "kvm", "s1")
    idx.add_sandbox("s2", "containerd")
    again = IdIndex(tmp_path)
    assert again.sandbox_backend("s1") == "kvm"
    assert again.sandbox_backend("s2") == "containerd"
    assert again.container_backend("c1") == "kvm"
    assert again.containers["c1"] == ("kvm", "s1")


def test_removing_a_sandbox_drops_its_containers_on_disk(tmp_path):
    idx = IdIndex(tmp_path)
    idx.add_sandbox("s1", "kvm")
    idx.add_container("c1", "kvm", "s1")
    idx.add_container("c2", "containerd", "s2")
    idx.remove_sandbox("s1")
    again = IdIndex(tmp_path)
    assert again.sandbox_backend("s1") is None and again.container_backend("c1") is None
    assert again.container_backend("c2") == "containerd"


def test_an_interrupted_write_leaves_no_record(tmp_path):
    idx = IdIndex(tmp_path)
    idx.add_sandbox("s1", "kvm")
    # What a kill -9 between write and rename leaves: a hidden temporary file.
    (tmp_path / "sandboxes" / ".s9.1234.tmp").write_text("kv")
    again = IdIndex(tmp_path)
    assert set(again.sandboxes) == {"s1"}
    assert not (tmp_path / "sandboxes" / ".s9.1234.tmp").exists()


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/b", "", ".hidden", "x" * 300])
def test_ids_that_are_not_plain_identifiers_are_refused(tmp_path, bad):
    idx = IdIndex(tmp_path)
    with pytest.raises(ValueError, match="not a plain identifier"):
        idx.add_sandbox(bad, "containerd")
    assert list((tmp_path / "sandboxes").iterdir()) == []


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(st.from_regex(r"[0-9a-f]{8,64}", fullmatch=True), st.sampled_from(["containerd", "kvm"]))
)
def test_any_set_of_records_round_trips(tmp_path_factory, records):
    d = tmp_path_factory.mktemp("idx")
    idx = IdIndex(d, fsync=True)
    for sid, backend in records.items():
        idx.add_sandbox(sid, backend)
    assert IdIndex(d).sandboxes == records
