#!/bin/sh
# P's boot script (busybox init's sysinit): mounts, network, data disk on md, workloads, source agent.
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

# --- data disk: md RAID1 (one leg for now) on the IDE disk with model $DISK_MODEL_DATA ----------
disk_by_model() {
  for d in /sys/block/sd*; do
    m=$(cat "$d/device/model" 2>/dev/null | sed 's/ *$//')
    [ "$m" = "$1" ] && { echo "/dev/${d##*/}"; return 0; }
  done
  return 1
}
modprobe -q raid1
data=$(disk_by_model "$DISK_MODEL_DATA")
if [ -n "$data" ]; then
  if mdadm --examine "$data" >/dev/null 2>&1; then
    mdadm --assemble --run "$MD_DEVICE" "$data" > /dev/null 2>&1 || say "ERROR md assemble $data"
  else
    mdadm --create "$MD_DEVICE" --run --quiet --level=1 --raid-devices=2 --metadata=1.2 \
      --bitmap=internal --name=p2vdata "$data" missing < /dev/null > /dev/null 2>&1 \
      && mkfs.ext4 -q -F -L p2vdata -E lazy_itable_init=1,lazy_journal_init=1 "$MD_DEVICE" > /dev/null 2>&1 \
      || say "ERROR md create on $data"
  fi
  mkdir -p "$DATA_MOUNT"
  mount -o noatime "$MD_DEVICE" "$DATA_MOUNT" && say "md $MD_DEVICE on $data mounted at $DATA_MOUNT" \
    || say "ERROR mount $MD_DEVICE"
else
  say "ERROR no disk with model $DISK_MODEL_DATA"
fi

# --- workloads (each its own session, stdio away from init's console) --------------------------
start() {  # start NAME CMD...: background, own session, pid in $STATE_DIR/NAME.pid
  name=$1; shift
  setsid "$@" < /dev/null > "$STATE_DIR/$name.out" 2>&1 &
  echo $! > "$STATE_DIR/$name.pid"
}
start counter python3 "$RIG_DIR/counter.py" "$COUNTER_LOG" "$MARK_COUNTER"
start echo python3 "$RIG_DIR/echo_server.py" "$ECHO_PORT"
if mountpoint -q "$DATA_MOUNT"; then
  start filewriter python3 "$RIG_DIR/file_writer.py" "$FILES_DIR"
fi

# --- the source agent (written by another part of the project; may not exist yet) --------------
if [ -f "$PROJECT_DIR/source_agent/main.py" ]; then
  (cd "$PROJECT_DIR" && setsid python3 -m source_agent.main --config "$AGENT_CONFIG" \
     --ready-file "$AGENT_READY_FILE" < /dev/null > "$AGENT_LOG" 2>&1 & echo $! > "$AGENT_PIDFILE")
  say "source agent started pid $(cat "$AGENT_PIDFILE")"
else
  echo "source_agent.main not present in $PROJECT_DIR" > "$AGENT_LOG"
  say "source agent NOT started: source_agent/main.py missing"
fi
say "$MARK_READY"
