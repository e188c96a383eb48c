# shellcheck shell=sh
# Shared by kiln's containerd scripts (engine: containerd): the `ctr` wrapper and the checks
# that containerd-run's companions wait on with kiln_await. Each check prints a short state on
# stdout and succeeds only when the condition holds.
# Every path is under ${KILN_ROOT:-} so the scripts can be tested on a host.

# kiln's containers live in their own containerd namespace.
KILN_CTR_NAMESPACE=kiln
# Written by images-import once the bundled images are in containerd (this boot).
KILN_IMPORTED=${KILN_ROOT:-}/run/kiln/images-imported

kiln_ctr() {
    ctr --namespace "$KILN_CTR_NAMESPACE" "$@"
}

# Whole seconds since boot.
uptime_seconds() {
    cut -d. -f1 /proc/uptime
}

# containerd answers on its socket.
containerd_up() {
    if out=$(kiln_ctr version 2>&1); then
        echo "containerd $(echo "$out" | sed -n 's/^ *Version: *//p' | tail -n 1) answers"
    else
        echo "no answer on /run/containerd/containerd.sock"
        return 1
    fi
}

# The bundled images are imported.
images_imported() {
    if [ -e "$KILN_IMPORTED" ]; then
        echo "done"
    else
        echo "not done yet"
        return 1
    fi
}

# The task of container $1 is RUNNING (`ctr task ls`: TASK PID STATUS).
task_running() {
    state=$(kiln_ctr task ls 2>/dev/null | awk -v n="$1" '$1 == n { print $3 }')
    if [ "$state" = RUNNING ]; then
        echo "RUNNING"
    else
        echo "${state:-no task yet}"
        return 1
    fi
}
