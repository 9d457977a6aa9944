#!/usr/bin/env bash
# run_sandboxed.sh CMD ARGS...: runs CMD roughly inside the file-system sandbox of
# deploy/systemd/*.service (ProtectSystem=strict, ProtectHome=yes, PrivateTmp=yes): in a private
# mount namespace every mount except /proc, /sys and /dev is remounted read-only, /tmp is a fresh
# tmpfs (the only writable place; CMD keeps its state and work dirs there) and /home and /root
# are empty and read-only. So a daemon that writes outside its state or work dir (its home, the
# current directory, /var, ...) fails the test CMD runs. Where a private mount namespace is not
# allowed (not root, no CAP_SYS_ADMIN) it says so and runs CMD directly.
set -euo pipefail
if ! unshare -m --propagation private true 2>/dev/null; then
  echo "note: no private mount namespace here (unshare -m); running without the sandbox"
  exec "$@"
fi
exec unshare -m --propagation private bash -c '
  set -euo pipefail
  awk "{print \$5}" /proc/self/mountinfo | sort -u | while read -r m; do
    case "$m" in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue ;; esac
    mount -o remount,bind,ro "$m" 2>/dev/null || true
  done
  mount -t tmpfs -o mode=1777 tmpfs /tmp
  for d in /home /root; do
    if [ -d "$d" ]; then mount -t tmpfs -o ro,mode=0755 tmpfs "$d"; fi
  done
  cd /tmp
  # Check the sandbox holds: writing outside /tmp fails.
  if touch /var/.mat-sandbox-probe 2>/dev/null || touch /.mat-sandbox-probe 2>/dev/null; then
    rm -f /var/.mat-sandbox-probe /.mat-sandbox-probe
    echo "FAIL the sandbox leaves / or /var writable"
    exit 1
  fi
  echo "sandbox: / read-only, /tmp private, /home and /root empty"
  exec "$@"
' run_sandboxed "$@"
