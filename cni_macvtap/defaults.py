"""The macvtap plugin's fixed defaults and limits, defined once.

Python code imports them from here; the native client (deploy/cni/macvtap-client.c) gets them from
the header cni_macvtap.cheader renders at build time. Import-free: the thin client loads it per call.
"""

DEFAULT_SOCKET = "/run/edgevirt/macvtap.sock"
DEFAULT_DEVICE_DIR = "/run/edgevirt/macvtap"
DEFAULT_STATE_DIR = "/var/lib/cni/macvtap"

# A network config on stdin larger than this is refused (code 5) and never read further.
MAX_STDIN = 1 << 20
# An environment larger than this is not sent to the daemon: the call runs in-process.
MAX_ENV = 1 << 20
# Largest stdout or stderr a client accepts from the daemon.
MAX_REPLY = 16 << 20
