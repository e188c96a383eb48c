# shellcheck shell=sh
# Hostname from /etc/hostname (written from the profile at build time).
name=$(cat /etc/hostname 2>/dev/null || echo kiln)
hostname "$name"
kiln_log hostname "$name"
