#!/usr/bin/env bash
# Makes sure this host has what the bench needs: Debian packages and the .venv with requirements.txt.
# Idempotent and silent when nothing is missing; every recipe in the justfile runs it first.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"

# command -> Debian package providing it
declare -A need=(
  [qemu-system-x86_64]=qemu-system-x86 [qemu-img]=qemu-utils [mmdebstrap]=mmdebstrap
  [mkfs.ext4]=e2fsprogs [chroot]=coreutils [ssh]=openssh-client
  [vagrant]=vagrant   # only `vagrant validate` of the Vagrantfile, in the host tests
  [gcc]=build-essential   # only the static stand-in for sudo of tests/guest/test_ssh_target.py
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
# `--kernel-build`: also what building a kernel from a tree needs (vm/kernel_tree.py)
if [ "${1:-}" = --kernel-build ]; then
  for pkg in build-essential bc bison flex libelf-dev libssl-dev cpio kmod; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "setup: missing ${missing[*]}; install them (Debian: apt-get install ${missing[*]})" >&2
    exit 2
  fi
  echo "setup: installing ${missing[*]} ..." >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
      >/tmp/ubd-setup-apt.log 2>&1; then
    echo "setup: apt-get install ${missing[*]} failed; see /tmp/ubd-setup-apt.log" >&2
    tail -5 /tmp/ubd-setup-apt.log >&2
    exit 2
  fi
fi

stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: preparing .venv (paramiko, pytest, ...) ..." >&2
  python3 -m venv .venv
  if ! .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt \
      >/tmp/ubd-setup-pip.log 2>&1; then
    echo "setup: pip install -r requirements.txt failed; see /tmp/ubd-setup-pip.log" >&2
    tail -5 /tmp/ubd-setup-pip.log >&2
    exit 2
  fi
  echo "$want" > "$stamp"
fi
