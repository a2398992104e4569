"""Shared plumbing of the tests (and of bench/ and deploy/cri/run_critest.py): one module per job.

Tests import these as ``helpers.<module>``: pytest puts ``tests/`` on sys.path when it loads the
rootdir conftest (tests/conftest.py); scripts outside pytest insert ``<repo>/tests`` themselves.

* :mod:`helpers.waiting` — ``wait_for``, the one polling helper;
* :mod:`helpers.root` — skip a test that needs root (or a tool) with the exact reason;
* :mod:`helpers.processes` — stop a process a test started (bounded), find a process's children;
* :mod:`helpers.netns` — commands, links and network namespaces (with veths) removed on close;
* :mod:`helpers.crictl` — the one crictl runner;
* :mod:`helpers.containerd` — the one private containerd (CRI and CNI tests, critest, bench);
* :mod:`helpers.pause_image` — a sandbox image built locally (nothing pulled);
* :mod:`helpers.shim` — an edgevirt-cri process of a test's own;
* :mod:`helpers.cni_env` — the macvtap CNI plugin's namespace topology and plugin runner;
* :mod:`helpers.cluster` — the handle on the local cluster (kubectl, crictl, patch, namespaces,
  service-account kubeconfigs, up/down);
* :mod:`helpers.controller` — edgevirt-controller as a subprocess;
* :mod:`helpers.tokens` — kubeconfigs acting as edgevirt's service accounts (the node's Node-bound);
* :mod:`helpers.vm_env` — VM-layer tests: console waits, domains, leftovers;
* :mod:`helpers.libvirt_daemon` — libvirtd + virtlogd, the node's or a private one;
* :mod:`helpers.attaching` — type into a VM's serial console through a real attach client.
"""

from __future__ import annotations

from pathlib import Path

#: the checkout these tests belong to
REPO = Path(__file__).resolve().parents[2]
