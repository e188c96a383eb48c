# shellcheck shell=sh
# Kernel and runtime filesystems: /proc, /sys, /dev (devtmpfs moved in by the initramfs),
# /dev/pts, /dev/shm, /run, /tmp and the unified cgroup hierarchy container runtimes need.
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mountpoint -q /dev/pts || mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mountpoint -q /dev/shm || mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm
# The initramfs mounts /run (it holds /run/kiln/lower and /run/kiln/rw); mount it only if missing.
mountpoint -q /run || mount -t tmpfs -o mode=0755,nosuid,nodev run /run
mkdir -p /run/kiln /run/lock
mountpoint -q /tmp || mount -t tmpfs -o mode=1777,nosuid,nodev tmp /tmp
mountpoint -q /sys/fs/cgroup || mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
kiln_log filesystems "proc sys dev run tmp cgroup2 mounted"
