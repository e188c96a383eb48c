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
