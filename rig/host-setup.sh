#!/bin/bash
# Prepare a fresh Debian 12 host (as root) for the rig: install what it needs, start virtlogd and
# libvirtd by hand (there is no systemd). Idempotent; silent on success; fast when already done.
set -euo pipefail

PACKAGES=(
  qemu-system-x86 qemu-utils            # P and the target VMs (TCG)
  libvirt-daemon-system libvirt-clients # the destination side
  libvirt-dev pkg-config gcc            # only to build libvirt-python (an sdist on PyPI)
  linux-image-amd64                     # P's kernel and modules (bonding, md, nbd) under /boot, /lib/modules
  busybox-static debootstrap e2fsprogs cpio kmod  # building P's image (mkfs.ext4 -d, initramfs, depmod)
  mdadm nbd-client                      # same tools on the host side
  iproute2 python3 python3-venv
)

if [ "$(id -u)" != 0 ]; then echo "rig/host-setup.sh: must run as root" >&2; exit 1; fi

missing=()
for p in "${PACKAGES[@]}"; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log=$(mktemp /tmp/p2v-host-setup.XXXXXX.log)
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
           --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
    echo "rig/host-setup.sh: apt-get install ${missing[*]} failed:" >&2; tail -30 "$log" >&2; exit 1
  fi
  rm -f "$log"
fi

running() { [ -f "$1" ] && [ -d "/proc/$(cat "$1")" ] && ! grep -q '^State:.*Z' "/proc/$(cat "$1")/status"; }
running /run/virtlogd.pid || virtlogd -d
running /run/libvirtd.pid || libvirtd -d
for _ in $(seq 1 100); do
  virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
  sleep 0.2
done
echo "rig/host-setup.sh: libvirtd does not answer (virsh -c qemu:///system version)" >&2
exit 1
