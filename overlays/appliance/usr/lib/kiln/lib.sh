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

# Reports the failure and leaves a shell on the console instead of a hung boot.
kiln_fatal() {
    kiln_error "$*"
    echo "[kiln] boot stopped: a root shell follows on the console; 'exit' continues booting"
    /bin/sh -l < /dev/console > /dev/console 2>&1 || true
}

# For services init respawns: reports why the service does not run here, then sleeps for
# good, so init does not start the script again in a loop.
kiln_idle() {
    kiln_log "$1" "$2"
    exec sleep 2147483647
}

# The `[kiln] ready` line that tests and operators wait for, once the node is fully up.
kiln_ready() {
    uptime_s=$(cut -d' ' -f1 /proc/uptime)
    echo "[kiln] ready arch=$(uname -m) host=$(hostname) uptime=${uptime_s}s"
    echo "ready arch=$(uname -m) host=$(hostname) uptime=${uptime_s}s" >> "$KILN_STATUS"
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
