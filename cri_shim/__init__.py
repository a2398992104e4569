"""edgevirt-cri: the CRI runtime.v1 endpoint kubelet talks to.

Routes runc/kata/default pods to containerd and runs kvm pods as libvirt/QEMU virtual machines.
"""
