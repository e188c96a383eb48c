# shellcheck shell=sh
# Kernel parameters from the profile's `sysctl` key (/etc/sysctl.d/kiln.conf, written by kiln).
conf=/etc/sysctl.d/kiln.conf
count=$(grep -c '^[^#]' "$conf" 2>/dev/null || true)
if [ "${count:-0}" -eq 0 ]; then
    kiln_log sysctl "nothing to set"
elif sysctl -p "$conf" > /dev/null 2>&1; then
    kiln_log sysctl "applied $count settings from $conf"
else
    kiln_log sysctl "applied $count settings from $conf with errors"
    kiln_error "sysctl: some settings in $conf were rejected by the kernel (profile key sysctl)"
fi
