# shellcheck shell=sh
# Shared helpers for kiln's on-device scripts: the console protocol, and waiting for a
# condition with retry lines (kiln_await).
# Every step prints exactly one line `[kiln] <step>: <detail>` to the console, and the same
# state is kept in /run/kiln/status for scripts (`<step>: <detail>` per line, newest last).

KILN_STATUS=/run/kiln/status

kiln_log() {
    step=$1
    shift
    echo "[kiln] $step: $*"
    if [ -d /run/kiln ]; then
        echo "$step: $*" >> "$KILN_STATUS"
    fi
}

kiln_error() {
    echo "[kiln] error: $*"
    if [ -d /run/kiln ]; then
        echo "error: $*" >> "$KILN_STATUS"
    fi
}

# Reports a failure that stops this boot from being complete. The error stays on the console,
# and the caller goes on (it decides what still makes sense; see /usr/lib/kiln/boot). No shell:
# anyone at the serial console or IPMI can make a step fail, and a shell there would be an
# unauthenticated root login. `debug.rescue_shell: true` in the profile (the build then writes
# /usr/lib/kiln/rescue-shell, in the read-only root, not in the persistent /etc) restores a root
# shell on the console for the bench; the caller goes on after `exit`.
kiln_fatal() {
    kiln_error "$*"
    if [ -e "${KILN_ROOT:-}/usr/lib/kiln/rescue-shell" ]; then
        echo "[kiln] boot paused: a root shell follows on the console (debug.rescue_shell); 'exit' continues booting"
        sh -l <> "${KILN_ROOT:-}/dev/console" >&0 2>&1 || true
    else
        echo "[kiln] no shell on the console (debug.rescue_shell is off): the error above stays here and in /run/kiln/status"
    fi
}

# For services init respawns: reports why the service does not run here, then sleeps for
# good, so init does not start the script again in a loop.
kiln_idle() {
    kiln_log "$1" "$2"
    exec sleep 2147483647
}

# kiln_supervise NAME LOG COMMAND...: runs a service that init respawns (the calling script is
# its inittab entry), its output appended to LOG through logpipe. When it exits, the console
# gets its exit status and the last lines of LOG, so a service that keeps failing says why
# instead of only "starting" again; then the script waits before returning to init: 1 s after
# a run of a minute or more, else twice the previous wait, up to 60 s (the wait is kept in
# /run/kiln/NAME.backoff). KILN_RESTART=no|on-failure (site services) stops after the first
# exit, or after a clean one.
kiln_supervise() {
    name=$1 log=$2
    shift 2
    run=${KILN_ROOT:-}/run/kiln
    mkdir -p "$run"
    rm -f "$run/$name.status"
    started=$(kiln_uptime)
    # `|| rc=$?`: callers run under `set -e`, which would end the group before the status is kept.
    { rc=0; "$@" 2>&1 < /dev/null || rc=$?; echo "$rc" > "$run/$name.status"; } | "${KILN_ROOT:-}/usr/lib/kiln/logpipe" "$log"
    status=$(cat "$run/$name.status" 2>/dev/null || echo unknown)
    ran=$(($(kiln_uptime) - started))
    wait_s=$(cat "$run/$name.backoff" 2>/dev/null || echo 0)
    if [ "$ran" -ge 60 ] || [ "$wait_s" -lt 1 ]; then wait_s=1; else wait_s=$((wait_s * 2)); fi
    [ "$wait_s" -le 60 ] || wait_s=60
    echo "$wait_s" > "$run/$name.backoff"
    kiln_log "$name" "exited with status $status after ${ran}s; last lines of ${log#"${KILN_ROOT:-}"}:"
    tail -n 5 "$log" 2>/dev/null | sed "s/^/[kiln] $name: | /"
    # KILN_RESTART (site services): `no`, or `on-failure` after a clean exit, ends it here.
    case "${KILN_RESTART:-always}:$status" in
        no:* | on-failure:0) kiln_idle "$name" "not started again (restart: $KILN_RESTART)" ;;
    esac
    kiln_log "$name" "starting again in ${wait_s}s"
    sleep "$wait_s"
}

# Whole seconds since boot.
kiln_uptime() {
    cut -d. -f1 "${KILN_ROOT:-}/proc/uptime" 2>/dev/null || echo 0
}

# kiln_need_space NAME MIB: a warning on the console when the data partition (/var/lib) has
# less than MIB MiB in all: a role that needs room (etcd, a k3s server) fails there later.
kiln_need_space() {
    total_kib=$(df -Pk "${KILN_ROOT:-}/var/lib" 2>/dev/null | awk 'NR == 2 { print $2 }')
    if [ -n "$total_kib" ] && [ "$total_kib" -lt $(($2 * 1024)) ]; then
        kiln_log "$1" "warning: the data partition (/var/lib) holds $((total_kib / 1024)) MiB; $1 needs at least $2 MiB: give the image a larger disk (the data partition grows to fill it on first boot)"
    fi
}

# kiln_need_images_space STEP: kiln_need_space for the bundled image archive
# (/usr/lib/kiln/images/kiln-images-<arch>.tar[.zst]) that containerd or k3s imports onto the data
# partition: an estimate of three times the archive (the content store keeps its blobs, the
# snapshots hold the layers unpacked, which are larger than the compressed blobs) plus 256 MiB.
# sh has no local variables: the names are prefixed so a caller's (images-import's `archive`)
# are not overwritten.
kiln_need_images_space() {
    for kiln_nis_archive in "${KILN_ROOT:-}"/usr/lib/kiln/images/kiln-images-*; do
        case $kiln_nis_archive in *.sha256) continue ;; esac
        [ -f "$kiln_nis_archive" ] || continue
        kiln_nis_mib=$(($(wc -c < "$kiln_nis_archive") / 1048576 + 1))
        kiln_need_space "$1" $((kiln_nis_mib * 3 + 256))
    done
}

# The `[kiln] ready` line that tests and operators wait for, once the node is fully up.
kiln_ready() {
    uptime_s=$(cut -d' ' -f1 /proc/uptime)
    echo "[kiln] ready arch=$(uname -m) host=$(hostname) uptime=${uptime_s}s"
    echo "ready arch=$(uname -m) host=$(hostname) uptime=${uptime_s}s" >> "$KILN_STATUS"
    # A trial boot of an update is kept only now (kiln-update good renames its boot entry).
    if [ -e "${KILN_ROOT:-}/run/kiln/update-trial" ]; then
        "${KILN_ROOT:-}/usr/sbin/kiln-update" good || true
    fi
}

# kiln_await STEP WHAT CHECK: runs CHECK until it succeeds, printing `[kiln] STEP: waiting for
# WHAT: <state>` before each retry, with a backoff from 2 s to 30 s. Never gives up: a service
# that needs more time (a peer still booting, a slow import) must come up whenever it can, and
# the console says what is missing.
kiln_await() {
    step=$1 what=$2 check=$3 delay=2 tries=1
    while ! state=$($check); do
        kiln_log "$step" "waiting for $what: $state (try $tries, next in ${delay}s)"
        sleep "$delay"
        tries=$((tries + 1))
        delay=$((delay * 2))
        [ "$delay" -le 30 ] || delay=30
    done
    kiln_log "$step" "$what: $state"
}

# kiln_hmac_sha256 KEYHEX MESSAGE: prints HMAC-SHA256 (RFC 2104) of MESSAGE (any text, newlines
# included; no NUL) under the key whose bytes KEYHEX spells, as 64 lower-case hex digits. The
# rollout agent (kiln-update follow) signs its reports with it; kiln serve checks them with
# builder/src/rollout.rs. busybox only: bytes are written with printf's octal escapes and hashed by
# sha256sum, the XOR is shell arithmetic. The key never becomes a command's argument (printf is a
# builtin), so it is not in /proc/*/cmdline. sh has no locals: every name is prefixed.
kiln_hmac_sha256() {
    kiln_hmac_key=$1
    case "$kiln_hmac_key" in
        *[!0-9a-fA-F]*)
            kiln_error "kiln_hmac_sha256: the key is not hex digits"
            return 1
            ;;
    esac
    if [ $((${#kiln_hmac_key} % 2)) -ne 0 ]; then
        kiln_error "kiln_hmac_sha256: the key has an odd number of hex digits"
        return 1
    fi
    # A key longer than the 64-byte block is replaced by its hash.
    if [ ${#kiln_hmac_key} -gt 128 ]; then
        kiln_hex_escapes "$kiln_hmac_key" 0 0
        # shellcheck disable=SC2059 # the format is the octal escapes
        kiln_hmac_key=$(printf "$kiln_hex_esc" | sha256sum)
        kiln_hmac_key=${kiln_hmac_key%% *}
    fi
    kiln_hex_escapes "$kiln_hmac_key" 54 64
    # shellcheck disable=SC2059
    kiln_hmac_inner=$({ printf "$kiln_hex_esc" && printf '%s' "$2"; } | sha256sum)
    kiln_hmac_inner=${kiln_hmac_inner%% *}
    kiln_hex_escapes "$kiln_hmac_key" 92 64
    kiln_hmac_outer_esc=$kiln_hex_esc
    kiln_hex_escapes "$kiln_hmac_inner" 0 0
    # shellcheck disable=SC2059
    kiln_hmac_out=$({ printf "$kiln_hmac_outer_esc" && printf "$kiln_hex_esc"; } | sha256sum)
    kiln_hex_esc="" kiln_hmac_outer_esc="" kiln_hmac_key=""
    echo "${kiln_hmac_out%% *}"
}

# kiln_hex_escapes HEX XOR LEN: sets kiln_hex_esc to printf octal escapes (\ooo) of the bytes HEX
# spells, each XORed with XOR (decimal), then bytes of value XOR up to LEN bytes (0: no padding).
# No subshells: a key's 64 bytes take no fork.
kiln_hex_escapes() {
    kiln_hex_rest=$1 kiln_hex_esc="" kiln_hex_n=0
    while [ -n "$kiln_hex_rest" ]; do
        kiln_hex_byte=$((0x${kiln_hex_rest%"${kiln_hex_rest#??}"} ^ $2))
        kiln_hex_rest=${kiln_hex_rest#??}
        kiln_hex_esc="$kiln_hex_esc\\$((kiln_hex_byte / 64))$((kiln_hex_byte / 8 % 8))$((kiln_hex_byte % 8))"
        kiln_hex_n=$((kiln_hex_n + 1))
    done
    while [ "$kiln_hex_n" -lt "$3" ]; do
        kiln_hex_esc="$kiln_hex_esc\\$(($2 / 64))$(($2 / 8 % 8))$(($2 % 8))"
        kiln_hex_n=$((kiln_hex_n + 1))
    done
    kiln_hex_byte="" kiln_hex_rest=""
}
