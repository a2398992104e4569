"""``edgevirt-node``: installs what must live on a node's host, and removes it again.

kubelet cannot get its CRI endpoint from one of its own pods, so edgevirt-cri (and the macvtap
daemon the kvm handler's network uses) run as host services. ``edgevirt-node install`` writes
edgevirt-cri's config, the systemd units, kubelet's drop-ins and, only when asked, libvirt's relaxed
settings; ``uninstall`` puts back exactly what it changed; ``status`` compares the node with what
was installed. One module per job:

* :mod:`.options` - the installer's settings, checked; errors name the flag and the fix
* :mod:`.cri_config` - edgevirt-cri's config file (YAML), checked by edgevirt-cri's own parser
* :mod:`.units` - the systemd units and drop-ins, kubelet's KubeletConfiguration drop-in (pure text)
* :mod:`.qemu_conf` - the marked block of relaxed settings in libvirt's qemu.conf (pure text)
* :mod:`.plan` - options -> the files, directories and links the node should have
* :mod:`.record` - the install record: everything written or changed and what was there before
* :mod:`.fsops` - file operations (atomic writes, backups) under a root directory
* :mod:`.apply` - install and uninstall, driven by the plan and the record
* :mod:`.cli` - the ``edgevirt-node`` command line
"""
