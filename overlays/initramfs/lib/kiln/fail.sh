# shellcheck shell=sh
# The initramfs's console policy, sourced by /init: what happens when a step fails (a missing
# root partition, an installer refusal, a bad download).
#
# By default there is no shell: the error stays on the console and the machine reboots after
# KILN_FAIL_DELAY seconds to try again (a disk that was still probing, a server that was down,
# a foreign disk someone has since removed). Anyone at the serial console or IPMI can make a
# step fail, so a shell here would be an unauthenticated root login.
# `debug.rescue_shell: true` in the profile (the build then puts lib/kiln/rescue-shell into the
# initramfs) restores the bench behaviour: a root shell, and /init again after `exit`. A file
# and not a kernel command-line word: the command line can be edited at the boot loader or sent
# by whoever answers a network boot, while the file follows the image.
#
# Paths are under ${KILN_ROOT:-} so builder/tests/device_scripts.rs can run this on a host.

KILN_FAIL_DELAY=30

fail() {
    echo "[kiln] error: $*"
    if [ -e "${KILN_ROOT:-}/lib/kiln/rescue-shell" ]; then
        echo "[kiln] initramfs: dropping to a shell (debug.rescue_shell); fix the problem and 'exit' to retry"
        sh
        exec "${KILN_ROOT:-}/init"
    fi
    echo "[kiln] initramfs: no shell on the console (debug.rescue_shell is off); rebooting in ${KILN_FAIL_DELAY} s to try again"
    sleep "$KILN_FAIL_DELAY"
    echo "[kiln] initramfs: rebooting"
    reboot -f
    # reboot -f does not return; if it did, PID 1 must not exit (a kernel panic): keep the
    # error on the console.
    exec sleep 2147483647
}
