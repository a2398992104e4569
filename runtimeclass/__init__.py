"""RuntimeClass definitions and the node probe that tells which runtimes really work on a node.

``runtimeclass.probe`` is the node capability probe: it boots a real guest under KVM with a timeout
(``/dev/kvm`` existing proves nothing on PVM hosts), checks QEMU TCG, Kata and libvirt, and maps the
result to the node labels ``edgevirt.io/kvm``, ``edgevirt.io/accel`` and ``edgevirt.io/kata``.
CLI: ``python -m runtimeclass.probe [--labels]``. One module per job: :mod:`.guests` (do guests
really run: KVM, TCG), :mod:`.kata`, :mod:`.libvirtd`, :mod:`.result` (checks and labels),
:mod:`.probe` (runs them once per boot, the cache file, the CLI).
"""
