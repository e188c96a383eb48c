# shellcheck shell=sh
# Time zone (from the profile's `time` key; /etc/localtime points into Debian's tzdata).
zone=UTC
if [ -r /etc/kiln/time.conf ]; then
    # shellcheck source=/dev/null
    . /etc/kiln/time.conf
    zone=${KILN_TIMEZONE:-UTC}
fi
kiln_log time "zone $zone ($(date +%Z)), clock $(date -u +%Y-%m-%dT%H:%M:%SZ), no NTP configured"
