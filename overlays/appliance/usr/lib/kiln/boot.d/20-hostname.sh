# shellcheck shell=sh
# Hostname from /etc/hostname (written from the profile at build time). In a cluster image the
# identity step (35-identity.sh) names the machine after its node, so this step only says so.
if [ -r /etc/kiln/cluster.conf ]; then
    kiln_log hostname "set by the identity step (cluster image)"
    exit 0
fi
name=$(cat /etc/hostname 2>/dev/null || echo kiln)
hostname "$name"
kiln_log hostname "$name"
