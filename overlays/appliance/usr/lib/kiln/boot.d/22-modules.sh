# shellcheck shell=sh
# Kernel modules: drivers for the network devices present (their modalias matched against
# modules.alias by modprobe: there is no udev), then the profile's `kernel.load` list
# (/etc/kiln/modules-load.conf, written by kiln at build time).

# Network controllers only: PCI class 0x02xxxx, and virtio devices of type 1 (net).
network_device_aliases() {
    for dev in /sys/bus/pci/devices/* /sys/bus/virtio/devices/*; do
        [ -r "$dev/modalias" ] || continue
        alias=$(cat "$dev/modalias")
        case "$alias" in
            virtio:d00000001v*) echo "$alias" ;;
            pci:*)
                class=$(cat "$dev/class" 2>/dev/null || echo 0)
                case "$class" in 0x02*) echo "$alias" ;; esac
                ;;
        esac
    done
}

# The kernel loads modules on demand (netfilter matches, filesystems, ...) by running
# /proc/sys/kernel/modprobe, /sbin/modprobe by default; busybox's modprobe is /usr/bin/modprobe.
if [ -w /proc/sys/kernel/modprobe ]; then
    echo /usr/bin/modprobe > /proc/sys/kernel/modprobe
fi

for alias in $(network_device_aliases); do
    modprobe -q "$alias" 2>/dev/null || true
done
nic_drivers=$(for d in /sys/class/net/*/device/driver; do [ -e "$d" ] && basename "$(readlink "$d")"; done | sort -u | tr '\n' ' ' | sed 's/ *$//')

loaded=""
failed=""
if [ -r /etc/kiln/modules-load.conf ]; then
    while read -r module; do
        case "$module" in ''|'#'*) continue ;; esac
        if modprobe "$module" 2>/dev/null; then
            loaded="$loaded $module"
        else
            failed="$failed $module"
        fi
    done < /etc/kiln/modules-load.conf
fi
kiln_log modules "network drivers: ${nic_drivers:-none}; loaded:${loaded:- none}${failed:+; FAILED:$failed}"
if [ -n "$failed" ]; then
    kiln_error "modules: could not load$failed (profile key kernel.load)"
fi
