# shellcheck shell=sh
# Who this machine is in the profile's cluster. kiln rendered every inventory node's files at
# build time (/etc/kiln/cluster.conf, /etc/kiln/inventory, /etc/kiln/nodes/<name>/); this step
# picks one: `kiln.node=<name>` on the kernel command line wins, then the MAC of any NIC listed
# in the inventory, then the cluster's default role with the host name
# `<cluster>-<MAC of the first wired NIC without colons>` (`_default`, completed here).
# It puts the node's files in place: /etc/rancher/k3s/config.yaml (0600), /etc/kiln/etcd.env,
# the node's etcd TLS files in /etc/kiln/etcd/ (private keys 0600, certificates 0644), the host name, /run/kiln/node.conf (the identity, for later steps) and, for a node with a
# static address, /run/kiln/network.conf, which 40-network.sh then reads instead of
# /etc/kiln/network.conf. The address goes on the NIC whose MAC matched, else the first wired NIC.
# /etc is persistent: files of a previous identity that the new one lacks are removed.
# Every path is under ${KILN_ROOT:-} so the step can be tested on a host.
R=${KILN_ROOT:-}
KILN_DIR=$R/etc/kiln
K3S_CONFIG=$R/etc/rancher/k3s/config.yaml

if [ ! -r "$KILN_DIR/cluster.conf" ]; then
    kiln_log identity "no cluster in this image"
    exit 0
fi
# shellcheck source=/dev/null
. "$KILN_DIR/cluster.conf"

node=""
nic=""
by=""

cmdline_node() {
    read -r cmdline < "$R/proc/cmdline" || true
    set -f
    for arg in $cmdline; do
        case "$arg" in kiln.node=*) node=${arg#kiln.node=} ;; esac
    done
    set +f
    [ -n "$node" ]
}

mac_node() {
    for dev in "$R"/sys/class/net/*; do
        [ -r "$dev/address" ] || continue
        read -r mac < "$dev/address" || continue
        name=$(awk -v m="$mac" '$1 == m { print $2; exit }' "$KILN_DIR/inventory")
        if [ -n "$name" ]; then
            node=$name
            nic=${dev##*/}
            return 0
        fi
    done
    return 1
}

first_wired() {
    for dev in "$R"/sys/class/net/*; do
        case "${dev##*/}" in eth*|en*) echo "${dev##*/}"; return 0 ;; esac
    done
}

if cmdline_node; then
    by=cmdline
    case "$node" in
        */*|.*|_default) known=no ;;
        *) if [ -r "$KILN_DIR/nodes/$node/node.conf" ]; then known=yes; else known=no; fi ;;
    esac
    if [ "$known" = no ]; then
        kiln_error "identity: kiln.node=$node is not in the inventory (known nodes: ${KILN_CLUSTER_NODES:-none})"
        exit 1
    fi
elif mac_node; then
    by=mac
else
    by=default
    node=_default
fi

dir=$KILN_DIR/nodes/$node
# shellcheck source=/dev/null
. "$dir/node.conf"
if [ "$by" = default ]; then
    wired=$(first_wired)
    if [ -z "$wired" ] || [ ! -r "$R/sys/class/net/$wired/address" ]; then
        kiln_error "identity: not in the inventory and no wired NIC (eth*, en*) to derive a host name from"
        exit 1
    fi
    read -r mac < "$R/sys/class/net/$wired/address"
    KILN_NODE_NAME=$KILN_CLUSTER_NAME-$(echo "$mac" | tr -d ':')
fi
name=$KILN_NODE_NAME

mkdir -p "$R/etc/rancher/k3s" "$R/run/kiln"
if [ -r "$dir/k3s-config.yaml" ]; then
    tmp=$K3S_CONFIG.kiln-tmp
    rm -f "$tmp"
    : > "$tmp"
    chmod 600 "$tmp"
    cat "$dir/k3s-config.yaml" >> "$tmp"
    [ "$by" != default ] || echo "node-name: \"$name\"" >> "$tmp"
    mv "$tmp" "$K3S_CONFIG"
else
    rm -f "$K3S_CONFIG"
fi
if [ -r "$dir/etcd.env" ]; then
    cp "$dir/etcd.env" "$KILN_DIR/etcd.env"
else
    rm -f "$KILN_DIR/etcd.env"
fi
# The node's TLS files (etcd member, or k3s server of an external etcd group), copied whole into
# a fresh directory that replaces the old one. umask 077 creates every file private before a
# byte of it is written; then certificates become 0644 and keys stay 0600 (etcd-run gives the
# member's keys to the etcd account).
tls=$KILN_DIR/etcd
rm -rf "$tls.kiln-tmp"
if [ -d "$dir/etcd" ]; then
    (
        umask 077
        mkdir "$tls.kiln-tmp"
        for f in "$dir"/etcd/*; do
            [ -f "$f" ] || continue
            cat "$f" > "$tls.kiln-tmp/${f##*/}"
            case "$f" in *.key) ;; *) chmod 644 "$tls.kiln-tmp/${f##*/}" ;; esac
        done
    )
    chmod 755 "$tls.kiln-tmp"
    rm -rf "$tls"
    mv "$tls.kiln-tmp" "$tls"
else
    rm -rf "$tls"
fi

echo "$name" > "$R/etc/hostname"
if [ -r "$R/etc/hosts" ]; then
    awk -v n="$name" 'BEGIN { OFS = "\t" } $1 == "127.0.1.1" { print $1, n; done = 1; next } { print } END { if (!done) print "127.0.1.1", n }' \
        "$R/etc/hosts" > "$R/etc/hosts.kiln-tmp"
    mv "$R/etc/hosts.kiln-tmp" "$R/etc/hosts"
fi
hostname "$name"

rm -f "$R/run/kiln/network.conf"
if [ -n "$KILN_NODE_ADDRESS" ]; then
    [ -n "$nic" ] || nic=$(first_wired)
    if [ -z "$nic" ]; then
        kiln_error "identity: node $name has address $KILN_NODE_ADDRESS but there is no wired NIC (eth*, en*)"
        exit 1
    fi
    {
        echo "# written by boot.d/35-identity.sh: node $name's static address, then /etc/kiln/network.conf without rules for $nic"
        echo "static $nic $KILN_NODE_ADDRESS ${KILN_NODE_GATEWAY:--}"
        if [ -r "$KILN_DIR/network.conf" ]; then
            awk -v i="$nic" '/^#/ || $1 == "dhcp-all" || ($1 ~ /^(dhcp|static)$/ && $2 == i) { next } { print }' "$KILN_DIR/network.conf"
        fi
    } > "$R/run/kiln/network.conf"
fi

roles=$(echo "$KILN_NODE_ROLES" | tr ' ' ',')
cat > "$R/run/kiln/node.conf" <<CONF
KILN_NODE_NAME="$name"
KILN_NODE_ROLES="$KILN_NODE_ROLES"
KILN_NODE_ADDRESS="$KILN_NODE_ADDRESS"
KILN_NODE_GATEWAY="$KILN_NODE_GATEWAY"
KILN_NODE_NIC="$nic"
KILN_NODE_BY="$by"
CONF
kiln_log identity "node=$name roles=${roles:-none} by=$by"
