"""The runtimes behind edgevirt-cri.

* :mod:`.base` - the :class:`~.base.Backend` interface the router calls, and
  :class:`~.base.TypedBackend` for backends that work on parsed runtime.v1 messages
* :mod:`.containerd` - the containerd passthrough (runc, kata)
* :mod:`.loader` - builds the configured backends (a ``plugin`` backend, e.g. the kvm handler
  :mod:`cri_shim.kvm`, by its factory)
"""
