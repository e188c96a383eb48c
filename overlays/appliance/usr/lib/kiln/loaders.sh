# shellcheck shell=sh
# Sourced by kiln-update: the configuration of a boot loader that does not read the Boot Loader
# Specification entries (U-Boot's extlinux, the Raspberry Pi firmware's config.txt), written from
# them so that it boots what systemd-boot would (docs/updates.md, "Boards without systemd-boot").
# Uses kiln-update's ESP (the mounted ESP or Pi boot partition) and ENTRIES (its loader/entries).

# Which boot loader reads the slots: the build names a loader that does not read the entries
# here (`extlinux` on U-Boot SPL boards, `raspberrypi`); images without the file, and images
# from before it existed, boot systemd-boot.
LOADER_KIND=$ESP/loader/kiln-loader

# systemd-boot, extlinux or raspberrypi.
loader_kind() {
    kind=$(cat "$LOADER_KIND" 2>/dev/null || true)
    echo "${kind:-systemd-boot}"
}

# A key's value in entry file $2 (`linux`, `initrd`, `options`, `devicetree`, `title`).
entry_key() {
    sed -n "s/^$1 //p" "$2" | head -n 1
}

# The generation of entry $1 (the number before the first '-' of its `version`), 0 for none.
entry_generation() {
    g=$(sed -n 's/^version \([0-9][0-9]*\)-.*/\1/p' "$1")
    echo "${g:-0}"
}

# The entry systemd-boot would boot, by its rules (docs/updates.md, "Boot entries and which one
# boots"): entries with tries left before those with none, then the highest generation.
chosen_entry() {
    best="" best_gen=-1 best_bad=2
    for e in "$ENTRIES"/kiln-*.conf; do
        [ -e "$e" ] || continue
        case "${e##*/}" in *+0.conf | *+0-*.conf) bad=1 ;; *) bad=0 ;; esac
        g=$(entry_generation "$e")
        if [ "$bad" -lt "$best_bad" ] || { [ "$bad" -eq "$best_bad" ] && [ "$g" -gt "$best_gen" ]; }; then
            best=$e best_gen=$g best_bad=$bad
        fi
    done
    [ -n "$best" ] && echo "$best"
}

# Replaces file $1 by $1.tmp when they differ (FAT: write aside, then rename over).
replace_file() {
    if cmp -s "$1.tmp" "$1" 2>/dev/null; then
        rm -f "$1.tmp"
    else
        mv "$1.tmp" "$1"
    fi
}

# Writes the configuration of a loader that does not read the entries, so it boots what
# systemd-boot would: after an update the trial (its entry still has a try), once the trial
# boot counted its try the other slot (so a crash or a failed trial falls back), and after
# `good` the kept slot. Called after every change to the entries.
render_loader() {
    case "$(loader_kind)" in
        extlinux) render_extlinux ;;
        raspberrypi) render_config_txt ;;
    esac
    sync
}

# U-Boot's extlinux.conf: one label per slot, the chosen one first and `default`.
render_extlinux() {
    first=$(chosen_entry) || return 0
    conf=$ESP/extlinux/extlinux.conf
    mkdir -p "$ESP/extlinux"
    {
        echo "# U-Boot distro boot (extlinux) configuration, written by kiln-update from loader/entries"
        echo "default $(basename "${first%%+*}" .conf)"
        echo "menu title $(entry_key title "$first")"
        echo "timeout 10"
        extlinux_label "$first"
        for e in "$ENTRIES"/kiln-*.conf; do
            if [ -e "$e" ] && [ "$e" != "$first" ]; then
                extlinux_label "$e"
            fi
        done
    } > "$conf.tmp"
    replace_file "$conf"
}

extlinux_label() {
    echo ""
    echo "label $(basename "${1%%+*}" .conf)"
    echo "    menu label $(entry_key title "$1")"
    echo "    kernel $(entry_key linux "$1")"
    echo "    initrd $(entry_key initrd "$1")"
    dt=$(entry_key devicetree "$1")
    [ -z "$dt" ] || echo "    fdt $dt"
    echo "    append $(entry_key options "$1")"
}

# The Raspberry Pi firmware's config.txt: its kernel=, initramfs and cmdline= lines name the
# chosen slot's files; the command line goes to cmdline.txt beside the slot's kernel. The rest
# of config.txt (the boards' device trees, the platform's lines) stays as the build wrote it.
render_config_txt() {
    first=$(chosen_entry) || return 0
    kernel=$(entry_key linux "$first")
    kernel=${kernel#/}
    initrd=$(entry_key initrd "$first")
    case "$kernel" in */*) cmdline=${kernel%/*}/cmdline.txt ;; *) cmdline=cmdline.txt ;; esac
    entry_key options "$first" > "$ESP/$cmdline.tmp"
    replace_file "$ESP/$cmdline"
    conf=$ESP/config.txt
    while IFS= read -r line || [ -n "$line" ]; do
        case "$line" in
            kernel=*) echo "kernel=$kernel" ;;
            "initramfs "*)
                echo "initramfs ${initrd#/} followkernel"
                echo "cmdline=$cmdline"
                ;;
            cmdline=*) ;;
            *) echo "$line" ;;
        esac
    done < "$conf" > "$conf.tmp"
    replace_file "$conf"
}
