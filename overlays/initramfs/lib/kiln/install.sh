# shellcheck shell=sh
# The installer, sourced by /init when the kernel command line has `kiln.install` (only the
# installer medium's boot entry has it). It finds the medium by its `kiln-install` partition,
# reads the install plan kiln wrote there (builder/src/installer.rs), picks the target disk,
# writes the system onto it, verifies every byte range against the plan's sha256 digests,
# creates the data partition and powers off or reboots. It never writes to the medium.
#
# Network install (`kiln.install=http://HOST:PORT/<arch>/netboot/`, from `kiln serve`'s iPXE
# script): the same steps, but the plan and the copied ranges come over HTTP (busybox udhcpc
# and wget). Each download is hashed while it streams onto the target and refused on a digest
# mismatch before anything else happens; at the end the installer reports
# `POST /installed?mac=...` to the server and reboots.
#
# Which disks it takes: a blank one; a kiln disk of this image's deployment (the plan's
# `deployment=`, which kiln records in the GPT name of the ESP, `esp@<deployment>`); anything
# else (other partitions or data, a kiln system of another deployment or one that records
# none) only with `install.wipe`.
#
# Crash safety: the first write removes the target's old partition table; the system's ranges
# are then written at their absolute offsets and read back, and only when every digest matches
# is the new partition table written; the data partition comes last. An install cut short
# leaves a disk with no partition table (the old data still on it, no longer referenced), which
# the next boot takes as blank and installs again; never a table pointing at half-written
# partitions. A target with a kiln table but no data partition is an unfinished install too.
# A target holding this very image (same disk GUID) with its data partition is a finished
# install: the medium then boots it instead of installing again (`after: reboot` with the
# medium still first in the boot order does not loop).
#
# Host tests (builder/tests/device_scripts.rs) run these functions against a fake root: every
# path below /sys, /dev and /run is under ${KILN_ROOT:-}.

INSTALL_PLAN=${KILN_ROOT:-}/run/kiln-install.plan
MIB=1048576

# The value of KEY in the install plan (first match).
plan_value() {
    sed -n "s/^$1=//p" "$INSTALL_PLAN" | head -n 1
}

# Every partition (e.g. vda3) whose GPT name is $1, on any disk.
partitions_named_anywhere() {
    for uevent in /sys/class/block/*/uevent; do
        if grep -qx "PARTNAME=$1" "$uevent" 2>/dev/null; then
            basename "$(dirname "$uevent")"
        fi
    done
}

# The whole disk a partition belongs to (sysfs puts partitions below their disk).
disk_of() {
    basename "$(dirname "$(readlink -f "/sys/class/block/$1")")"
}

# Disks are probed asynchronously (USB, NVMe, SATA): wait until the list of block devices has
# not changed for 2 s (at most 10 s) so `auto` sees every disk of the machine.
wait_for_disks_to_settle() {
    last="" stable=0 tries=0
    while [ "$stable" -lt 20 ] && [ "$tries" -lt 100 ]; do
        now=$(cd /sys/block && echo *)
        if [ "$now" = "$last" ]; then
            stable=$((stable + 1))
        else
            stable=0
            last=$now
        fi
        tries=$((tries + 1))
        sleep 0.1
    done
}

find_medium() {
    tries=0
    while [ -z "$(partitions_named_anywhere kiln-install)" ]; do
        tries=$((tries + 1))
        [ "$tries" -le 300 ] || fail "install: no partition named kiln-install after 30 s (block devices: $(cd /sys/class/block && echo *))"
        sleep 0.1
    done
    wait_for_disks_to_settle
    # shellcheck disable=SC2046 # one partition name per word
    set -- $(partitions_named_anywhere kiln-install)
    [ "$#" -eq 1 ] || fail "install: $# installer media attached (kiln-install partitions: $*); attach only one"
    INSTALL_PART=$1
    MEDIUM=$(disk_of "$INSTALL_PART")
    ensure_node "$INSTALL_PART"
    head -c "$MIB" "/dev/$INSTALL_PART" | tr -d '\000' > "$INSTALL_PLAN"
    if [ "$(plan_value kiln-install)" != 1 ] || [ "$(plan_value end)" != 1 ]; then
        fail "install: /dev/$INSTALL_PART holds no complete install plan; the medium is damaged: write the image to it again"
    fi
    log "install: medium /dev/$MEDIUM, image $(plan_value image)"
}

# The NIC iPXE booted from (`kiln.mac=`) first, then every other NIC with a device.
candidate_nics() {
    want=$(cmdline_value kiln.mac | tr 'A-F' 'a-f')
    for dev in /sys/class/net/*; do
        [ -e "$dev/device" ] || continue
        if [ "$(cat "$dev/address")" = "$want" ]; then
            echo "${dev##*/}"
        fi
    done
    for dev in /sys/class/net/*; do
        [ -e "$dev/device" ] || continue
        if [ "$(cat "$dev/address")" != "$want" ]; then
            echo "${dev##*/}"
        fi
    done
}

# Brings up the first NIC that gets a DHCP lease; sets INSTALL_MAC (the MAC the server knows
# this machine by: iPXE's, else the NIC's). NIC drivers probe asynchronously: retry for 60 s.
network_up() {
    tries=0
    while :; do
        for nic in $(candidate_nics); do
            ip link set "$nic" up 2> /dev/null || continue
            if udhcpc -i "$nic" -n -q -t 3 -T 2 -s /lib/kiln/udhcpc.script > /dev/null 2>&1; then
                INSTALL_MAC=$(cmdline_value kiln.mac | tr 'A-F' 'a-f')
                [ -n "$INSTALL_MAC" ] || INSTALL_MAC=$(cat "/sys/class/net/$nic/address")
                log "install: network $nic $(ip -4 -o addr show dev "$nic" | sed -n 's/.* inet \([^ ]*\).*/\1/p') (machine $INSTALL_MAC)"
                return 0
            fi
        done
        tries=$((tries + 1))
        [ "$tries" -le 12 ] || fail "install: no DHCP lease on any NIC after 60 s (NICs: $(cd /sys/class/net && echo *)); check the cable and the DHCP server"
        sleep 1
    done
}

# Network install: fetches the plan from $INSTALL_URL.
fetch_plan() {
    case "$INSTALL_URL" in
        http://*/) ;;
        http://*) INSTALL_URL=$INSTALL_URL/ ;;
        *) fail "install: kiln.install=$INSTALL_URL is not an http:// URL" ;;
    esac
    network_up
    tries=0
    until wget -q -O "$INSTALL_PLAN" "${INSTALL_URL}plan"; do
        tries=$((tries + 1))
        [ "$tries" -le 5 ] || fail "install: cannot download ${INSTALL_URL}plan; is kiln serve running and reachable?"
        sleep 2
    done
    # The script that booted this installer named the plan by digest (kiln.plan=): a plan from
    # anyone else who answers on the network is refused before a byte is written.
    want=$(cmdline_value kiln.plan)
    [ -n "$want" ] || fail "install: no kiln.plan= on the kernel command line: boot the installer through kiln serve's /boot.ipxe"
    got=$(sha256sum < "$INSTALL_PLAN")
    got=${got%% *}
    [ "$got" = "$want" ] || fail "install: ${INSTALL_URL}plan has sha256 $got, the boot script named $want: the server holds another build, or something else answered; nothing was written"
    if [ "$(plan_value kiln-install)" != 1 ] || [ "$(plan_value end)" != 1 ]; then
        fail "install: ${INSTALL_URL}plan is no complete install plan"
    fi
    MEDIUM=""
    log "install: from ${INSTALL_URL}, image $(plan_value image)"
}

# Network install: streams copy $1 (file $2 of the netboot directory) onto the target at byte
# $3 while sha256sum reads the same bytes through a fifo; refuses unless the digest is $5.
# At most $4 bytes (the plan's length) reach the disk: a larger file (another build, or a
# hostile server) cannot write past its slot before its digest is checked.
stream_copy() {
    run=${KILN_ROOT:-}/run
    fifo=$run/kiln-install.fifo
    rm -f "$fifo"
    mkfifo "$fifo"
    sha256sum < "$fifo" > "$run/kiln-install.sha" &
    hasher=$!
    log "install: streaming $1 from $INSTALL_URL$2 to $(($3 / MIB)) MiB of /dev/$TARGET"
    wget -q -O - "$INSTALL_URL$2" | head -c "$4" | tee "$fifo" \
        | dd of="${KILN_ROOT:-}/dev/$TARGET" bs="$MIB" seek=$(($3 / MIB)) conv=notrunc,fsync 2> /dev/null \
        || fail "install: writing $1 to /dev/$TARGET failed"
    wait "$hasher" || true
    got=$(cut -d' ' -f1 "$run/kiln-install.sha")
    [ "$got" = "$5" ] || fail "install: $1 from $INSTALL_URL$2 arrived with sha256 $got, the plan says $5 (download cut off, or the server holds another build); the target has no partition table yet and installs again on the next boot"
    log "install: $1 arrived intact (sha256 $5)"
}

# Network install: tells the server this machine is installed (its next network boot then goes
# to the disk). A failed report is not fatal: an installed target is detected and booted anyway.
report_installed() {
    origin=$(echo "$INSTALL_URL" | sed 's,^\(http://[^/]*\)/.*,\1,')
    if wget -q -O /dev/null --post-data "" "$origin/installed?mac=$INSTALL_MAC&arch=$(uname -m)&image=$(plan_value image)&cred=$(cmdline_value kiln.cred)"; then
        log "install: reported to $origin (machine $INSTALL_MAC installed)"
    else
        log "install: could not report to $origin; the next network boot starts the installer again, which finds this image installed and boots it"
    fi
}

# A new data partition for the installed system: always a new filesystem (a reinstall never
# re-attaches an earlier install's /etc, /var/lib or /var/log), seeded from the root just
# written, with this node's secrets when the server has any for it (network install).
prepare_data() {
    root_dev=$(partition_named "$TARGET" kiln-root-a) || fail "install: /dev/$TARGET has no kiln-root-a partition after the install"
    ensure_node "$root_dev"
    ensure_node "$DATA_DEV"
    mkdir -p /run/kiln-new-root
    mount -t squashfs -o ro "/dev/$root_dev" /run/kiln-new-root || fail "install: cannot mount the new root /dev/$root_dev"
    format_data "/dev/$DATA_DEV" /run/kiln-new-data /run/kiln-new-root
    umount /run/kiln-new-root
    [ -z "$(cmdline_value kiln.secrets)" ] || deliver_secrets /run/kiln-new-data
    mark_data_ready /run/kiln-new-data
    umount /run/kiln-new-data
    log "install: data partition /dev/$DATA_DEV ready"
}

# Network install of an inventory node: fetches its secrets from kiln serve with the one-time
# credential of this install (kiln.cred=), checks them against the digest the boot script named
# (kiln.secrets=), and lays them into the data partition mounted on $1: /etc files into the
# /etc upper layer, /var/lib files into /var/lib. They never touch the served images.
deliver_secrets() {
    origin=$(echo "$INSTALL_URL" | sed 's,^\(http://[^/]*\)/.*,\1,')
    bundle=/run/kiln-secrets.cpio
    wget -q -O "$bundle" "$origin/secrets?mac=$INSTALL_MAC&cred=$(cmdline_value kiln.cred)" \
        || fail "install: $origin refused this node's secrets (its server log says why: a second fetch with the same credential, a restarted server, or another machine with this MAC took them); the next network boot installs again"
    got=$(sha256sum < "$bundle")
    got=${got%% *}
    [ "$got" = "$(cmdline_value kiln.secrets)" ] || fail "install: the secrets from $origin have sha256 $got, the boot script named $(cmdline_value kiln.secrets)"
    mkdir -p /run/kiln-secrets
    (cd /run/kiln-secrets && cpio -i -d -m -u < "$bundle" 2> /dev/null) || fail "install: cannot unpack the secrets from $origin"
    rm -f "$bundle"
    [ ! -d /run/kiln-secrets/etc ] || cp -a /run/kiln-secrets/etc/. "$1/etc/upper/"
    [ ! -d /run/kiln-secrets/var/lib ] || cp -a /run/kiln-secrets/var/lib/. "$1/var/lib/"
    count=$(find /run/kiln-secrets -type f | wc -l)
    rm -rf /run/kiln-secrets
    log "install: $count secret files of node $(cmdline_value kiln.node) delivered into the data partition (fetched once from $origin)"
}

# Whole disks that could be targets at all (not loop, RAM, optical, eMMC boot areas ...).
all_disks() {
    for d in "${KILN_ROOT:-}"/sys/block/*; do
        name=${d##*/}
        case "$name" in
            loop* | ram* | zram* | sr* | fd* | dm-* | md* | nbd* | mtdblock* | *boot[0-9] | *rpmb) continue ;;
        esac
        [ "$(cat "$d/size")" -gt 0 ] || continue
        echo "$name"
    done
}

disk_bytes() {
    echo $(($(cat "${KILN_ROOT:-}/sys/block/$1/size") * 512))
}

# The /dev/disk/by-id names udev would give disk $1, for the buses kiln knows without udev.
disk_ids() {
    d=/sys/block/$1
    case "$1" in
        vd*)
            if [ -s "$d/serial" ]; then
                echo "virtio-$(cat "$d/serial")"
            fi
            ;;
        nvme*)
            model=$(sed 's/^ *//; s/ *$//; s/  */_/g' "$d/device/model")
            serial=$(sed 's/^ *//; s/ *$//; s/  */_/g' "$d/device/serial")
            echo "nvme-${model}_${serial}"
            ;;
    esac
}

# Whether disk $1 matches the profile's `install.target` ($2): /dev/NAME or /dev/disk/by-id/ID
# shell patterns.
matches_target() {
    case "$2" in
        /dev/disk/by-id/*)
            for id in $(disk_ids "$1"); do
                # shellcheck disable=SC2254 # the pattern is the profile's glob
                case "$id" in ${2#/dev/disk/by-id/}) return 0 ;; esac
            done
            return 1
            ;;
        /dev/*)
            # shellcheck disable=SC2254
            case "$1" in ${2#/dev/}) return 0 ;; esac
            return 1
            ;;
    esac
    return 1
}

# Non-zero bytes in MiB number $2 of disk $1.
mib_has_data() {
    [ "$(dd if="${KILN_ROOT:-}/dev/$1" bs="$MIB" skip="$2" count=1 2>/dev/null | tr -d '\000' | head -c 1 | wc -c)" -gt 0 ]
}

# Whether disk $1 has a partition whose GPT name is $2 (sysfs puts partitions below their disk).
has_partition_named() {
    grep -qx "PARTNAME=$2" "${KILN_ROOT:-}"/sys/class/block/"$1"/*/uevent 2> /dev/null
}

# The deployment kiln recorded on disk $1: the GPT name of its ESP is `esp@<deployment>`
# (builder/src/pipeline/disk.rs, esp_name). Empty output: no partition records one.
recorded_deployment() {
    for uevent in "${KILN_ROOT:-}"/sys/class/block/"$1"/*/uevent; do
        [ -e "$uevent" ] || continue
        name=$(sed -n 's/^PARTNAME=//p' "$uevent")
        case "$name" in
            esp@?*)
                echo "${name#esp@}"
                return 0
                ;;
        esac
    done
}

# Why disk $1 is not a blank disk or a kiln disk of this image's deployment, as the rest of the
# sentence "/dev/X ..." (empty output: it is one of those, and may be installed onto).
foreign_data() {
    # kiln-root-a: root slot A's GPT name, as builder/src/pipeline/disk.rs names it (ROOT_A).
    if has_partition_named "$1" kiln-root-a; then
        want=$(plan_value deployment)
        recorded=$(recorded_deployment "$1")
        if [ -z "$recorded" ]; then
            echo "holds a kiln system that records no deployment (written before kiln recorded one); this image is deployment $want"
        elif [ "$recorded" != "$want" ]; then
            echo "holds a kiln system of another deployment ($recorded; this image is deployment $want)"
        fi
        return 0
    fi
    for part in "${KILN_ROOT:-}/sys/block/$1/$1"*; do
        if [ -e "$part" ]; then
            echo "holds data that is not a kiln system (it has partitions: $(cd "${KILN_ROOT:-}/sys/block/$1" && echo "$1"*))"
            return 0
        fi
    done
    if mib_has_data "$1" 0; then
        echo "holds data that is not a kiln system (its first MiB is not blank)"
    elif mib_has_data "$1" $(($(disk_bytes "$1") / MIB - 1)); then
        echo "holds data that is not a kiln system (its last MiB is not blank)"
    fi
}

# Sets TARGET from the plan's target, min_size and wipe; refuses with every disk it saw and why.
select_target() {
    spec=$(plan_value target)
    min=$(plan_value min_size)
    seen="" best=0 TARGET="" matched=""
    for disk in $(all_disks); do
        ensure_node "$disk"
        size=$(disk_bytes "$disk")
        why=""
        if [ "$disk" = "$MEDIUM" ]; then
            why="the installer medium"
        elif [ "$spec" != auto ] && ! matches_target "$disk" "$spec"; then
            why="does not match $spec"
        elif [ "$spec" = auto ] && [ "$(cat "${KILN_ROOT:-}/sys/block/$disk/removable")" = 1 ]; then
            why="removable"
        elif [ "$(cat "${KILN_ROOT:-}/sys/block/$disk/ro")" = 1 ]; then
            why="read-only"
        elif [ "$size" -lt "$min" ]; then
            why="smaller than install.min_size $((min / MIB)) MiB"
        elif [ "$spec" != auto ]; then
            matched="$matched $disk"
            TARGET=$disk
        elif [ "$size" -gt "$best" ]; then
            best=$size
            TARGET=$disk
        fi
        seen="$seen${seen:+; }$disk $((size / MIB)) MiB${why:+ ($why)}"
    done
    # shellcheck disable=SC2086 # one disk name per word
    set -- $matched
    if [ "$#" -gt 1 ]; then
        fail "install: target $spec matches $# disks ($*); it must match exactly one. Disks: $seen"
    fi
    [ -n "$TARGET" ] || fail "install: no disk qualifies as target ($spec). Disks: $seen"
    foreign=$(foreign_data "$TARGET")
    if [ -n "$foreign" ]; then
        if [ "$(plan_value wipe)" != 1 ]; then
            fail "install: /dev/$TARGET $foreign; it was left untouched. Set install.wipe: true to overwrite it, or choose another install.target. Disks: $seen"
        fi
        log "install: /dev/$TARGET $foreign; install.wipe is set: overwriting it"
    fi
    TARGET_SEEN=$seen
}

# The target already holds this image, completely installed.
target_has_this_image() {
    data=$(partition_named "$TARGET" "$DATA_NAME") || return 1
    guid=$(/sbin/sgdisk -p "/dev/$TARGET" 2>/dev/null | sed -n 's/^Disk identifier (GUID): //p' | tr 'A-F' 'a-f')
    [ "$guid" = "$(plan_value disk_guid)" ] || return 1
    # The installer formats the data partition and marks it ready last: a partition without the
    # marker is an install cut short (its secrets may be missing), so it is installed again.
    ensure_node "$data"
    mkdir -p /run/kiln-check
    mount -t ext4 -o ro "/dev/$data" /run/kiln-check 2> /dev/null || return 1
    ready=1
    [ -e "/run/kiln-check/$DATA_MARKER" ] || ready=0
    umount /run/kiln-check
    [ "$ready" = 1 ]
}

# The plan's copy lines, in a file: loops read it by redirection, not through a pipe, so `fail`
# runs in the installer's own shell rather than a subshell.
INSTALL_COPIES=${KILN_ROOT:-}/run/kiln-install.copies

# Removes the target's old partition tables (GPT, its backup, the protective MBR) before any
# system byte is written: the old table would otherwise point at partitions being overwritten.
clear_partition_table() {
    "${KILN_ROOT:-}/sbin/sgdisk" --zap-all "${KILN_ROOT:-}/dev/$TARGET" > /dev/null 2>&1 \
        || fail "install: cannot remove the old partition table of /dev/$TARGET"
    log "install: old partition table of /dev/$TARGET removed; the new one is written after verification"
}

# Writes every copy of the plan at its absolute offset on the target, each bounded by the
# plan's length; no partition table yet (see verify_system).
write_system() {
    sed -n 's/^copy=//p' "$INSTALL_PLAN" > "$INSTALL_COPIES"
    clear_partition_table
    while read -r name source source_offset target_offset length sha; do
        if [ -n "$INSTALL_URL" ]; then
            stream_copy "$name" "$source" "$target_offset" "$length" "$sha"
            continue
        fi
        source_dev=$(partition_named "$MEDIUM" "$source") || fail "install: the medium has no $source partition"
        ensure_node "$source_dev"
        log "install: writing $name ($(((length + MIB - 1) / MIB)) MiB) at $((target_offset / MIB)) MiB of /dev/$TARGET"
        # count_bytes: exactly the plan's length, not whole blocks of whatever follows it.
        dd if="${KILN_ROOT:-}/dev/$source_dev" of="${KILN_ROOT:-}/dev/$TARGET" bs="$MIB" skip=$((source_offset / MIB)) \
            seek=$((target_offset / MIB)) count="$length" iflag=count_bytes conv=notrunc,fsync 2> /dev/null \
            || fail "install: writing $name to /dev/$TARGET failed"
    done < "$INSTALL_COPIES"
}

# Reads every copied range back from the disk (not the page cache) and checks its digest; only
# then writes the new partition table, so a disk whose table names a kiln system holds one
# whole (until the data partition exists, an unfinished install: the next boot installs again).
verify_system() {
    sync
    blockdev --flushbufs "${KILN_ROOT:-}/dev/$TARGET" || true
    echo 3 > "${KILN_ROOT:-}/proc/sys/vm/drop_caches"
    while read -r name _source _source_offset target_offset length sha; do
        count=$(((length + MIB - 1) / MIB))
        got=$(dd if="${KILN_ROOT:-}/dev/$TARGET" bs="$MIB" skip=$((target_offset / MIB)) count="$count" 2> /dev/null | head -c "$length" | sha256sum)
        got=${got%% *}
        [ "$got" = "$sha" ] || fail "install: $name on /dev/$TARGET reads back as sha256 $got, the image has $sha; the disk may be failing (it has no partition table now; the next boot installs again)"
        log "install: verified $name (sha256 $sha)"
    done < "$INSTALL_COPIES"
    # Word splitting is wanted: the plan holds sgdisk's arguments, one per word.
    # shellcheck disable=SC2046
    "${KILN_ROOT:-}/sbin/sgdisk" $(plan_value sgdisk) "${KILN_ROOT:-}/dev/$TARGET" > /dev/null \
        || fail "install: cannot write the partition table of /dev/$TARGET"
    log "install: partition table written to /dev/$TARGET (deployment $(plan_value deployment))"
}

install_system() {
    INSTALL_URL=$(cmdline_value kiln.install)
    if [ -n "$INSTALL_URL" ]; then
        fetch_plan
        # kiln serve chose the node from this machine's MAC; the installed system finds the same
        # node by the same MAC (boot.d/35-identity.sh), so the name needs no hand-over.
        node=$(cmdline_value kiln.node)
        [ -z "$node" ] || log "install: this machine is inventory node $node (kiln.node= from the server, chosen by MAC $INSTALL_MAC)"
    else
        find_medium
    fi
    select_target
    if target_has_this_image; then
        log "install: /dev/$TARGET already holds image $(plan_value image); booting it"
        [ -z "$INSTALL_URL" ] || report_installed
        return 0
    fi
    log "install: target=/dev/$TARGET size=$(($(disk_bytes "$TARGET") / MIB))MiB image=$(plan_value image) (disks: $TARGET_SEEN)"
    write_system
    verify_system
    # Read by /init's ensure_data_partition.
    # shellcheck disable=SC2034
    BOOT_DISK=$TARGET
    # shellcheck disable=SC2034
    STEP=install
    ensure_data_partition
    prepare_data
    sync
    log "install: done target=/dev/$TARGET"
    [ -z "$INSTALL_URL" ] || report_installed
    case "$(plan_value after)" in
        reboot)
            log "install: rebooting"
            reboot -f
            ;;
        *)
            log "install: powering off; remove the installer medium before the next start"
            poweroff -f
            ;;
    esac
    # poweroff/reboot -f do not return; if they fail, say so instead of booting on.
    fail "install: $(plan_value after) failed; the install is complete, switch the machine off"
}
