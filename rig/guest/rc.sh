#!/bin/sh
# P's boot script (busybox init's sysinit): mounts and network. services.sh starts the rest.
# It must stay fast (the rig's target is "agent ready" < 20 s under TCG) and must never hang:
# every wait below is bounded.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
. /etc/p2v-rig/rig.env
up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "P2V-RIG [$(up)] $*" > /dev/console; }

mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -o remount,rw,noatime /
mkdir -p "$STATE_DIR" /run/p2v
hostname -F /etc/hostname
# keep the (slow) serial console for warnings; the workloads' lines must not drown in kernel chatter
echo "4 4 1 7" > /proc/sys/kernel/printk
say "boot script start"

# --- network: P's NIC (e1000, found by its fixed MAC) gets P's fixed address --------------------
modprobe -q e1000
ip link set lo up
nic=
n=0
while [ -z "$nic" ] && [ $n -lt 50 ]; do
  for d in /sys/class/net/*; do
    [ "$(cat "$d/address" 2>/dev/null)" = "$P_MAC" ] && nic=${d##*/}
  done
  [ -n "$nic" ] || { sleep 0.1; n=$((n+1)); }
done
if [ -n "$nic" ]; then
  ip addr add "$P_IP/$P_PREFIX_LEN" dev "$nic"
  ip link set "$nic" up
  say "network $nic $P_IP/$P_PREFIX_LEN"
else
  say "ERROR no NIC with MAC $P_MAC"
fi
say "base system up"
