// The two shell scripts that bring a guest up. Pure text, unit-tested; the image
// builder writes them into the initramfs and the root image.

/** Modules the cloud kernel builds as modules, in load order (dependencies first). */
export const GUEST_MODULES = [
  "virtio_ring",
  "virtio",
  "virtio_mmio",
  "virtio_console",
  "virtio_blk",
  "failover",
  "net_failover",
  "virtio_net",
  "virtio-rng",
  "overlay",
] as const;

const GUEST_NODE = "/opt/forkd/bin/node";
const GUEST_AGENT = "/opt/forkd/agent.js";
const GUEST_STAGE2 = "/opt/forkd/init";

/**
 * Stage 1 (initramfs /init): load the virtio modules, mount the read-only root
 * image, put a tmpfs-backed overlay on top so every write lives in guest RAM
 * (and so is captured by a memory snapshot), then switch to it.
 */
export function initramfsInit(modules: readonly string[]): string {
  return `#!/bin/busybox sh
BB=/bin/busybox
$BB mount -t proc proc /proc
$BB mount -t sysfs sysfs /sys
$BB mount -t devtmpfs devtmpfs /dev
for m in ${modules.join(" ")}; do
  [ -f /lib/modules/$m.ko ] && { $BB insmod /lib/modules/$m.ko || echo "forkd-init: insmod $m failed" >/dev/console; }
done
i=0
while [ ! -b /dev/vda ]; do
  i=$((i+1)); [ $i -gt 1000 ] && { echo "forkd-init: no /dev/vda after 10 s" >/dev/console; $BB poweroff -f; }
  $BB usleep 10000
done
$BB mount -t ext4 -o ro /dev/vda /ro || { echo "forkd-init: cannot mount the root image" >/dev/console; $BB poweroff -f; }
$BB mount -t tmpfs -o mode=0755 tmpfs /rw
$BB mkdir -p /rw/upper /rw/work
$BB mount -t overlay overlay -o lowerdir=/ro,upperdir=/rw/upper,workdir=/rw/work /newroot || { echo "forkd-init: overlay mount failed" >/dev/console; $BB poweroff -f; }
$BB mount --move /dev /newroot/dev
$BB mount --move /proc /newroot/proc
$BB mount --move /sys /newroot/sys
exec $BB switch_root /newroot ${GUEST_STAGE2}
`;
}

/**
 * Stage 2 (PID 1 on the real root): basic mounts, loopback and user-mode
 * networking, then the agent, restarted if it ever exits. ash as PID 1 reaps
 * orphaned children, which Node would not.
 */
export function stage2Init(): string {
  return `#!/opt/forkd/bin/busybox sh
# Every tool by the busybox path: the root may be busybox alone or any distribution.
BB=/opt/forkd/bin/busybox
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
$BB mkdir -p /dev/pts /dev/shm /tmp /run
$BB mount -t devpts devpts /dev/pts 2>/dev/null
$BB mount -t tmpfs -o mode=1777 tmpfs /dev/shm 2>/dev/null
$BB chmod 1777 /tmp
$BB hostname forkd
# An idle guest must not wake up: under TCG every wake-up costs host CPU in every
# child. No proactive compaction (kcompactd checked twice a second), vmstat folded
# once a minute instead of every second, no probing of "managed" neighbours (none
# exist; each table re-armed its work every 5 s).
echo 0 >/proc/sys/vm/compaction_proactiveness 2>/dev/null
echo 60 >/proc/sys/vm/stat_interval 2>/dev/null
for t in ipv4 ipv6; do echo 3600000 >/proc/sys/net/$t/neigh/default/interval_probe_time_ms 2>/dev/null; done
$BB ip link set lo up 2>/dev/null
if $BB ip link show eth0 >/dev/null 2>&1; then
  # No IPv6 duplicate-address detection or router solicitation on a link that is
  # this VMM's alone: their timers would still be running in every child of a
  # snapshot taken seconds after boot.
  for k in dad_transmits router_solicitations; do echo 0 >/proc/sys/net/ipv6/conf/eth0/$k 2>/dev/null; done
  # QEMU user-mode networking: fixed addresses, private to each VMM process.
  $BB ip addr add 10.0.2.15/24 dev eth0 && $BB ip link set eth0 up && $BB ip route add default via 10.0.2.2
fi
export UV_THREADPOOL_SIZE=8 HOME=/root
# A root without /root runs the agent from /.
cd /root || cd /
while true; do
  ${GUEST_NODE} --no-memory-reducer ${GUEST_AGENT} </dev/null >/dev/console 2>&1
  echo "forkd-init: agent exited with status $?; restarting" >/dev/console
  $BB sleep 0.2
done
`;
}

/** Run the host's node with the loader and libraries it was linked against, whatever libc the image has. */
export function nodeWrapper(): string {
  return `#!/opt/forkd/bin/busybox sh
exec /opt/forkd/lib/ld-linux-x86-64.so.2 --library-path /opt/forkd/lib /opt/forkd/bin/node.bin "$@"
`;
}

/** Name lookups from files first: \`localhost\` must never become a DNS query leaving the sandbox. */
export const NSSWITCH_CONF = `passwd: files
group: files
shadow: files
hosts: files dns
networks: files
protocols: files
services: files
`;
