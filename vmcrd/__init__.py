"""The VirtualMachine custom resource (edgevirt.io/v1alpha1), its controller and the kubectl-vm plugin."""
