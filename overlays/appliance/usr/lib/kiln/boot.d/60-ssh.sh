# shellcheck shell=sh
# SSH host keys: generated on the device's first boot (never in the image, so every device has
# its own), into /etc/dropbear, which is persistent (/etc's writable layer is on the data
# partition); later boots keep them. ed25519 and ecdsa only: RSA generation is far too slow on
# small boards and under emulation. dropbear itself is started by init (inittab `respawn`) once
# every boot step is done, with the flags of the profile's `ssh` policy.
KEY_DIR=/etc/dropbear

uptime_ms() {
    awk '{ printf "%d", $1 * 1000 }' /proc/uptime
}

# Writes a key to a temporary name and renames it: a power cut never leaves a truncated key.
generate_key() {
    type=$1
    file=$2
    rm -f "$file.tmp"
    dropbearkey -t "$type" -f "$file.tmp" > /dev/null 2>&1
    chmod 0600 "$file.tmp"
    mv "$file.tmp" "$file"
}

fingerprint() {
    dropbearkey -y -f "$1" 2> /dev/null | sed -n 's/^Fingerprint: *//p'
}

ssh_host_keys() {
    mkdir -p "$KEY_DIR"
    chmod 0700 "$KEY_DIR"
    made=""
    started=$(uptime_ms)
    for type in ed25519 ecdsa; do
        file="$KEY_DIR/dropbear_${type}_host_key"
        if [ ! -s "$file" ]; then
            generate_key "$type" "$file"
            made="$made $type"
        fi
    done
    if [ -n "$made" ]; then
        sync
        took=$(( $(uptime_ms) - started ))
        keys="generated host keys${made} in $((took / 1000)).$(( (took % 1000) / 100 )) s"
    else
        keys="host keys kept"
    fi
    echo "$keys; ed25519 $(fingerprint "$KEY_DIR/dropbear_ed25519_host_key")"
}

server=none
if [ -r /etc/kiln/ssh.conf ]; then
    # shellcheck source=/dev/null
    . /etc/kiln/ssh.conf
    server=${KILN_SSH_SERVER:-none}
fi
if [ "$server" = dropbear ]; then
    keys=$(ssh_host_keys)
    kiln_log ssh "dropbear on port ${KILN_SSH_PORT:-22} (root login ${KILN_SSH_ROOT_LOGIN:-no}, password auth ${KILN_SSH_PASSWORD_AUTH:-no}); $keys"
else
    kiln_log ssh "no SSH server configured"
fi
