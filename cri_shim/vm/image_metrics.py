"""Prometheus metrics of the image store: how much disk was taken out of images, and how long it took.

=================================================  =========  =====================================
metric                                             type       labels
=================================================  =========  =====================================
``edgevirt_vm_image_extracted_bytes_total``        counter    ``source`` (``containerd``): disk
                                                              bytes written into the disk cache,
                                                              counted as they are written (a large
                                                              conversion shows its progress)
``edgevirt_vm_image_extract_seconds``              histogram  ``source``, ``outcome`` (``ok``,
                                                              ``failed``): one disk taken out of
                                                              an image
``edgevirt_vm_image_resolutions_total``            counter    ``kind`` (``oci``, ``https``,
                                                              ``file``), ``result`` (``cached``,
                                                              ``fetched``, ``failed``)
=================================================  =========  =====================================

The collectors are made without a registry: a process that serves metrics registers them in its
own (:func:`collectors`; edgevirt-cri does, through the kvm handler).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram
from prometheus_client.registry import Collector

SECONDS_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

EXTRACTED_BYTES = Counter(
    "edgevirt_vm_image_extracted_bytes",
    "Disk bytes taken out of images into the VM disk cache, by source",
    ["source"],
    registry=None,
)
EXTRACT_SECONDS = Histogram(
    "edgevirt_vm_image_extract_seconds",
    "Time to take one disk out of an image into the VM disk cache (seconds)",
    ["source", "outcome"],
    buckets=SECONDS_BUCKETS,
    registry=None,
)
RESOLUTIONS = Counter(
    "edgevirt_vm_image_resolutions",
    "VM image references resolved to a cached disk, by kind and result",
    ["kind", "result"],
    registry=None,
)


def collectors() -> list[Collector]:
    """The image store's collectors, to register in a process's registry."""
    return [EXTRACTED_BYTES, EXTRACT_SECONDS, RESOLUTIONS]
