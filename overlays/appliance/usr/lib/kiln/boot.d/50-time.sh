# shellcheck shell=sh
# Time zone and NTP (from the profile's `time` key; /etc/localtime points into Debian's tzdata).
# chronyd itself is started by init (inittab) after the boot steps; it needs its state directory
# on the persistent /var/lib, owned by the account it drops to.
zone=UTC
KILN_NTP_SERVERS=""
if [ -r /etc/kiln/time.conf ]; then
    # shellcheck source=/dev/null
    . /etc/kiln/time.conf
    zone=${KILN_TIMEZONE:-UTC}
fi
if [ -n "$KILN_NTP_SERVERS" ]; then
    mkdir -p /var/lib/chrony
    chown _chrony:_chrony /var/lib/chrony
    ntp="ntp servers $KILN_NTP_SERVERS (chronyd)"
else
    ntp="no NTP configured"
fi
kiln_log time "zone $zone ($(date +%Z)), clock $(date -u +%Y-%m-%dT%H:%M:%SZ), $ntp"
