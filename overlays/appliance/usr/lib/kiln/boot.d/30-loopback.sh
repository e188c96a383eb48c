# shellcheck shell=sh
# The loopback interface: local services (k3s, etcd, containerd) talk over it.
ip link set lo up
kiln_log network "lo up"
