# shellcheck shell=sh
# Kernel and runtime filesystems: /proc, /sys, /dev (devtmpfs moved in by the initramfs),
# /dev/pts, /dev/shm, /run, /tmp and the unified cgroup hierarchy container runtimes need.

# Is something mounted at $1? (busybox builds differ in whether they have `mountpoint`.)
mounted() {
    [ -r /proc/mounts ] && grep -q " $1 " /proc/mounts
}

mounted /proc || mount -t proc proc /proc
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mounted /dev/pts || mount -t devpts -o gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mounted /dev/shm || mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm
# The initramfs mounts /run (it holds /run/kiln/lower and /run/kiln/rw); mount it only if missing.
mounted /run || mount -t tmpfs -o mode=0755,nosuid,nodev run /run
mkdir -p /run/kiln /run/lock
mounted /tmp || mount -t tmpfs -o mode=1777,nosuid,nodev tmp /tmp
mounted /sys/fs/cgroup || mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
kiln_log filesystems "proc sys dev run tmp cgroup2 mounted"
