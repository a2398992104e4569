"""The macvtap CNI plugin: a macvtap NIC on the node's network for VM pods, with IPAM delegation."""
