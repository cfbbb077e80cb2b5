#!/usr/bin/env bash
# Install qrad-agent as a systemd service on a Debian-based board (Debian, Raspberry Pi OS,
# Ubuntu, Armbian). Run from a checkout, as root:
#
#   sudo scripts/install.sh [--start]
#
# What it does (each step is skipped when already done, so running it again is safe and is
# how an upgrade is installed):
#   1. a virtualenv in /opt/qrad-agent with this checkout installed (needs python3-venv);
#   2. the service user and groups (systemd-sysusers: qrad-agent, i2c, dialout);
#   3. the unit, the tmpfiles snippet (write access to the cpufreq/RAPL limits), the udev
#      rule (/dev/i2c-* to group i2c), i2c-dev loaded at boot;
#   4. /etc/qrad-agent/qrad-agent.toml from configs/qrad-agent.toml, only if there is none
#      (an existing config is never touched);
#   5. daemon-reload, udev and tmpfiles applied, the service enabled (started with --start).
#
# Options:
#   --prefix DIR  install under DIR instead of / (for packaging and tests): nothing outside
#                 DIR is changed, and the steps that act on the running system (systemctl,
#                 udevadm, modprobe, apt-get) are left out
#   --dry-run     print what would be done, change nothing
#   --no-python   do not create or update the virtualenv (the package is installed otherwise)
#   --start       start (or restart) the service at the end
set -euo pipefail

prefix=""
dry_run=0
python=1
start=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || { echo "install.sh: --prefix needs a directory" >&2; exit 2; }
              prefix="${2%/}"; shift 2 ;;
    --prefix=*) prefix="${1#--prefix=}"; prefix="${prefix%/}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    --no-python) python=0; shift ;;
    --start) start=1; shift ;;
    -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option '$1'; allowed: --prefix DIR, --dry-run, --no-python," \
            "--start, --help" >&2; exit 2 ;;
  esac
done

src="$(cd "$(dirname "$0")/.." && pwd)"
for f in systemd/qrad-agent.service systemd/qrad-agent.sysusers systemd/qrad-agent.tmpfiles \
         systemd/99-qrad-agent.rules configs/qrad-agent.toml pyproject.toml; do
  [ -f "$src/$f" ] || { echo "install.sh: $src/$f is missing: run it from a qrad-agent checkout" >&2; exit 2; }
done
if [ -z "$prefix" ] && [ "$dry_run" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (sudo scripts/install.sh), or use --prefix DIR / --dry-run" >&2
  exit 2
fi
live=1  # act on the running system (services, udev, kernel modules)
[ -z "$prefix" ] || live=0

say() { printf '%s\n' "$*"; }
run() {  # run a command, or show it under --dry-run
  if [ "$dry_run" -eq 1 ]; then say "would run: $*"; else "$@"; fi
}
put() {  # put FILE at DEST with MODE, only if it differs
  local file="$1" dest="$prefix$2" mode="$3"
  if [ -f "$dest" ] && cmp -s "$file" "$dest"; then
    say "up to date: $dest"
    return
  fi
  if [ "$dry_run" -eq 1 ]; then say "would install: $dest (mode $mode)"; return; fi
  install -D -m "$mode" "$file" "$dest"
  say "installed: $dest"
}

# 1. the program
venv="$prefix/opt/qrad-agent"
if [ "$python" -eq 1 ]; then
  if [ "$live" -eq 1 ] && ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    run apt-get install -y python3-venv
  fi
  [ -x "$venv/bin/python" ] || run python3 -m venv "$venv"
  run "$venv/bin/pip" install --quiet --upgrade "$src"
  # the technician's command: `qrad-agent status`, `qrad-agent doctor`
  run mkdir -p "$prefix/usr/local/bin"
  run ln -sfn /opt/qrad-agent/bin/qrad-agent "$prefix/usr/local/bin/qrad-agent"
fi

# 2. the user (systemd-sysusers reads the same file at every boot)
put "$src/systemd/qrad-agent.sysusers" /usr/lib/sysusers.d/qrad-agent.conf 0644
if command -v systemd-sysusers >/dev/null 2>&1; then
  if [ "$live" -eq 1 ]; then
    run systemd-sysusers qrad-agent.conf
  else
    for f in passwd:0644 group:0644 shadow:0640 gshadow:0640; do  # sysusers edits these
      [ -e "$prefix/etc/${f%:*}" ] || run install -D -m "${f#*:}" /dev/null "$prefix/etc/${f%:*}"
    done
    run systemd-sysusers --root="$prefix" "$prefix/usr/lib/sysusers.d/qrad-agent.conf"
  fi
else
  echo "install.sh: systemd-sysusers not found (apt-get install systemd)" >&2
  exit 1
fi

# 3. the service and its access to the hardware
put "$src/systemd/qrad-agent.service" /etc/systemd/system/qrad-agent.service 0644
put "$src/systemd/qrad-agent.tmpfiles" /usr/lib/tmpfiles.d/qrad-agent.conf 0644
put "$src/systemd/99-qrad-agent.rules" /etc/udev/rules.d/99-qrad-agent.rules 0644
modules="$(mktemp)"
trap 'rm -f "$modules"' EXIT
printf '# the room sensors are read through /dev/i2c-* (qrad-agent)\ni2c-dev\n' > "$modules"
put "$modules" /etc/modules-load.d/qrad-agent.conf 0644

# 4. the config: never overwritten
conf="$prefix/etc/qrad-agent/qrad-agent.toml"
if [ -e "$conf" ]; then
  say "kept: $conf (an existing config is never replaced)"
elif [ "$dry_run" -eq 1 ]; then
  say "would install: $conf from configs/qrad-agent.toml (mode 0640, group qrad-agent)"
else
  install -D -m 0640 "$src/configs/qrad-agent.toml" "$conf"
  # the group as the target system knows it (under --prefix, from its own /etc/group)
  gid="$(awk -F: '$1 == "qrad-agent" { print $3 }' "$prefix/etc/group" 2>/dev/null || true)"
  if [ -n "$gid" ]; then chgrp "$gid" "$conf" "$(dirname "$conf")"; fi
  chmod 0750 "$(dirname "$conf")"
  say "installed: $conf: set node.id and the sensors before starting"
fi

# 5. apply on the running system
if [ "$live" -eq 1 ]; then
  run modprobe i2c-dev || say "note: i2c-dev could not be loaded (no I2C on this board?)"
  run udevadm control --reload
  run udevadm trigger --action=add --subsystem-match=i2c-dev --subsystem-match=cpu \
      --subsystem-match=powercap
  run systemd-tmpfiles --create qrad-agent.conf
  run systemctl daemon-reload
  run systemctl enable qrad-agent.service
  if [ "$start" -eq 1 ]; then
    run systemctl restart qrad-agent.service
  fi
  say "done. Check the board: qrad-agent doctor; see it run: qrad-agent status, journalctl -u qrad-agent -f"
  [ "$start" -eq 1 ] || say "start it with: systemctl start qrad-agent"
else
  say "done (under $prefix; nothing on the running system was changed)"
fi
