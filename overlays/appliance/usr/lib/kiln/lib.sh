# shellcheck shell=sh
# Shared helpers for kiln's on-device scripts: the console protocol.
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
