"""The local single-node edgevirt cluster: etcd, the Kubernetes control plane, kubelet, containerd,
a local image registry and libvirtd, each a background process with a pid file and a log file under
one state directory, all listening on loopback only. Driven by deploy/local/up and deploy/local/down.

Stdlib only: it runs before (and independently of) the project's virtualenv.
"""
