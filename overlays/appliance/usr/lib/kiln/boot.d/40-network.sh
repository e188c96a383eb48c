# shellcheck shell=sh
# Network from /etc/kiln/network.conf (written by kiln from the profile's `network` key):
# `dhcp-all` (every wired interface), `dhcp IF`, `static IF ADDRESS GATEWAY|-`, `dns IP`.
# A cluster node with a static address gets /run/kiln/network.conf from 35-identity.sh (same
# format), which is used instead.
# DHCP waits a bounded time for a lease (DHCP_TRIES x 1 s); without one, udhcpc keeps trying
# in the background and the boot goes on.
CONF=/etc/kiln/network.conf
if [ -r /run/kiln/network.conf ]; then
    CONF=/run/kiln/network.conf
fi
DHCP_TRIES=5
DHCP_SCRIPT=/usr/share/udhcpc/default.script
summary=""

note() {
    summary="${summary:+$summary, }$*"
}

wired_interfaces() {
    for dev in /sys/class/net/*; do
        name=${dev##*/}
        case "$name" in eth*|en*) echo "$name" ;; esac
    done
}

addresses_of() {
    ip -o addr show dev "$1" 2>/dev/null | awk '$3 == "inet" || ($3 == "inet6" && $4 !~ /^fe80/) { printf "%s%s", sep, $4; sep = " " }'
}

configure_dhcp() {
    if [ ! -e "/sys/class/net/$1" ]; then
        note "$1 missing"
        return 0
    fi
    ip link set "$1" up
    udhcpc -i "$1" -t "$DHCP_TRIES" -T 1 -b -s "$DHCP_SCRIPT" -p "/run/udhcpc.$1.pid" > /dev/null 2>&1 || true
    addr=$(addresses_of "$1")
    if [ -n "$addr" ]; then
        note "$1 $addr (dhcp)"
    else
        note "$1 no lease after ${DHCP_TRIES} s (dhcp continues in the background)"
    fi
}

configure_static() {
    if [ ! -e "/sys/class/net/$1" ]; then
        note "$1 missing"
        return 0
    fi
    ip link set "$1" up
    ip addr add "$2" dev "$1"
    if [ "$3" != - ]; then
        case "$3" in
            *:*) ip -6 route add default via "$3" dev "$1" ;;
            *) ip route add default via "$3" dev "$1" ;;
        esac
    fi
    if [ "$3" = - ]; then
        note "$1 $2 (static)"
    else
        note "$1 $2 (static, gateway $3)"
    fi
}

write_resolv_conf() {
    servers=$(awk '$1 == "dns" { print "nameserver " $2 }' "$CONF")
    [ -n "$servers" ] || return 0
    echo "$servers" > /etc/resolv.conf.kiln-tmp
    mv /etc/resolv.conf.kiln-tmp /etc/resolv.conf
    # Tells the DHCP script to leave /etc/resolv.conf alone.
    : > /run/kiln/dns-static
}

[ -r "$CONF" ] || { kiln_log network "no $CONF: not configured"; exit 0; }
write_resolv_conf
while read -r kind name address gateway; do
    case "$kind" in
        dhcp-all)
            found=""
            for ifname in $(wired_interfaces); do
                found=1
                configure_dhcp "$ifname"
            done
            [ -n "$found" ] || note "no wired interface found"
            ;;
        dhcp) configure_dhcp "$name" ;;
        static) configure_static "$name" "$address" "$gateway" ;;
    esac
done < "$CONF"
kiln_log network "${summary:-nothing configured}"
