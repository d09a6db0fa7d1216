#!/bin/busybox sh
# The bench's initramfs: load the few modules the root disk needs, mount it, hand over to its init.
B=/bin/busybox
$B mkdir -p /proc /sys /dev /newroot
$B mount -t proc proc /proc
$B mount -t devtmpfs devtmpfs /dev
for m in $($B cat /modules.list); do $B insmod "/modules/$m" || echo "initramfs: insmod $m failed" >/dev/console; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 500 ]; do $B usleep 10000; i=$((i+1)); done
$B mount -t ext4 -o rw /dev/vda /newroot || { echo "initramfs: cannot mount /dev/vda" >/dev/console; exec $B sh; }
# a kernel built from a tree brings its modules along (vm/kernel_tree.py); the root is an overlay
for d in /kmods/*; do [ -d "$d" ] && $B cp -a "$d" /newroot/usr/lib/modules/; done
$B umount /proc
$B mount --move /dev /newroot/dev
exec $B switch_root /newroot /bin/busybox init
