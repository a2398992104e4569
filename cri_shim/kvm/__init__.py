"""The CRI ``kvm`` runtime handler of edgevirt-cri: a pod is a network namespace with a macvtap NIC,
its one container a libvirt/QEMU virtual machine.

Importing this package imports nothing else: the VirtualMachine controller imports
:mod:`.contract` (the VM pod's annotations) without loading the handler, gRPC or libvirt.
"""
