#!/bin/sh
# P's services (busybox init `once`, in parallel with the control channel server): the source agent,
# the workloads, the data disk on md. Prints the ready marker when all are started.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
. /etc/p2v-rig/rig.env
up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "P2V-RIG [$(up)] $*" > /dev/console; }

# --- processes (each its own session, stdio away from init's console) -------------------------
start() {  # start NAME CMD...: background, own session, pid in $STATE_DIR/NAME.pid
  name=$1; shift
  setsid "$@" < /dev/null > "$STATE_DIR/$name.out" 2>&1 &
  echo $! > "$STATE_DIR/$name.pid"
}

# --- the source agent first: its imports take seconds under TCG (may not exist yet) -----------
if [ -f "$PROJECT_DIR/source_agent/main.py" ]; then
  (cd "$PROJECT_DIR" && setsid python3 -m source_agent.main --config "$AGENT_CONFIG" \
     --ready-file "$AGENT_READY_FILE" < /dev/null > "$AGENT_LOG" 2>&1 & echo $! > "$AGENT_PIDFILE")
  say "source agent started pid $(cat "$AGENT_PIDFILE")"
else
  echo "source_agent.main not present in $PROJECT_DIR" > "$AGENT_LOG"
  say "source agent NOT started: source_agent/main.py missing"
fi

# --- workloads 1 and 2 -------------------------------------------------------------------------
start counter python3 "$RIG_DIR/counter.py" "$COUNTER_LOG" "$MARK_COUNTER"
start echo python3 "$RIG_DIR/echo_server.py" "$ECHO_PORT"

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

# --- workload 3 needs the md disk ----------------------------------------------------------------
if mountpoint -q "$DATA_MOUNT"; then
  start filewriter python3 "$RIG_DIR/file_writer.py" "$FILES_DIR"
fi

say "$MARK_READY"
