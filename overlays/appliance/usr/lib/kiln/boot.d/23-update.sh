# shellcheck shell=sh
# A/B updates (docs/updates.md): on a trial boot of an update, start the health timer (the slot
# is kept at `[kiln] ready`, rolled back on a failed step or timeout); after a rollback, report
# it and remove the failed entry; record which version last used the data partition; apply a
# bundle from a KILN-UPDATE medium. After the modules step: the ESP is vfat, maybe a module.
"${KILN_ROOT:-}/usr/sbin/kiln-update" boot
