#!/usr/bin/env bash
# Checks deploy/systemd/ (ctest deploy_systemd):
#   check_systemd.sh SOURCE_DIR BIN_DIR
# `systemd-analyze verify` on mat-coordinator.service and an instance of mat-worker@.service
# (mat-worker@1.service), with ExecStart's /usr/local/bin/ pointed at BIN_DIR (verify wants the
# executables to exist); any message (unknown key, bad value, missing binary) fails, since verify
# exits 0 on most of them. Then `systemd-analyze security --offline` must rate the units'
# exposure at most 2.0 (coordinator) and 3.5 (worker); the units must keep the hardening and
# service settings the deployment relies on (and set MemoryMax= and TasksMax= limits; the
# coordinator Type=notify with a WatchdogSec, the worker RestartPreventExitStatus=78); the example env files must set every variable the
# units' ExecStart uses; each ExecStart, expanded with its example env file, must run and stop
# with exit 0 on SIGTERM.
set -euo pipefail
src=$1
bin=$2
units=$src/deploy/systemd
if ! command -v systemd-analyze >/dev/null; then
  echo "FAIL systemd-analyze not found (Debian package systemd)"
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for u in mat-coordinator.service mat-worker@.service; do
  sed "s#/usr/local/bin/#$bin/#g" "$units/$u" >"$tmp/$u"
done
fails=0
cd "$tmp"
for u in mat-coordinator.service mat-worker@1.service; do
  out=$(systemd-analyze verify --man=no "./$u" 2>&1) && rc=0 || rc=$?
  if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
    echo "FAIL systemd-analyze verify $u (rc $rc):"
    echo "$out"
    fails=$((fails + 1))
  else
    echo "ok   systemd-analyze verify $u"
  fi
done
for pair in mat-coordinator.service:20 mat-worker@1.service:35; do
  u=${pair%%:*}
  threshold=${pair##*:}
  if out=$(systemd-analyze security --offline=yes --threshold="$threshold" "./$u" 2>&1); then
    echo "ok   systemd-analyze security $u: $(echo "$out" | grep 'Overall exposure' | sed 's/.*: //')"
  else
    echo "FAIL systemd-analyze security $u: exposure above $((threshold / 10)).$((threshold % 10)):"
    echo "$out" | grep -E '✗|Overall' || echo "$out"
    fails=$((fails + 1))
  fi
done
for u in mat-coordinator.service mat-worker@.service; do
  for want in '^User=mat$' '^Restart=on-failure$' '^KillSignal=SIGTERM$' '^TimeoutStopSec=' \
      '^ProtectSystem=strict$' '^ProtectHome=yes$' '^PrivateTmp=yes$' '^NoNewPrivileges=yes$' \
      '^StateDirectory=mat ' '^ReadWritePaths=/var/lib/mat/' '^ExecStart=/usr/local/bin/mat-' \
      '^EnvironmentFile=/etc/mat/' '^MemoryMax=[0-9]+[KMGT]?$' '^TasksMax=[0-9]+$'; do
    if ! grep -Eq "$want" "$units/$u"; then
      echo "FAIL $u: no line matching $want"
      fails=$((fails + 1))
    fi
  done
done
for pair in 'mat-coordinator.service:^Type=notify$' 'mat-coordinator.service:^WatchdogSec=[0-9]+s?$' \
    'mat-coordinator.service:^NotifyAccess=main$' 'mat-worker@.service:^RestartPreventExitStatus=78$'; do
  u=${pair%%:*}
  want=${pair#*:}
  if ! grep -Eq "$want" "$units/$u"; then
    echo "FAIL $u: no line matching $want"
    fails=$((fails + 1))
  fi
done
check_env() {  # UNIT ENVFILE
  local vars v
  vars=$(grep '^ExecStart=' "$units/$1" | grep -oE '\$\{?[A-Z_][A-Z0-9_]*' | tr -d '${' | sort -u)
  for v in $vars; do
    if ! grep -Eq "^$v=" "$units/$2"; then
      echo "FAIL $2 does not set $v (used by $1)"
      fails=$((fails + 1))
    fi
  done
}
check_env mat-coordinator.service coordinator.env
check_env mat-worker@.service worker-0.env
# Run each unit's ExecStart as systemd would expand it with the example env file (${X}: one
# argument, $X: split on spaces; %i=1), with /usr/local/bin -> BIN_DIR, /var/lib/mat -> a temp
# dir, listen addresses and the rendezvous port -> port 0, the example coordinator address -> a
# closed port: the command line must be accepted (still running 2 s after its first log line;
# the daemons log only once their stop signals are handled, so a slow start under load, e.g.
# LibTorch's libraries loading, cannot be mistaken for a failure) and SIGTERM must stop it with
# exit 0.
run_execstart() {  # UNIT ENVFILE
  local line v val args pid rc
  line=$(grep '^ExecStart=' "$units/$1" | cut -d= -f2-)
  line=${line//%i/1}
  for v in $(echo "$line" | grep -oE '\$\{?[A-Z_][A-Z0-9_]*' | tr -d '${' | sort -u); do
    val=$(grep -E "^$v=" "$units/$2" | head -n1 | cut -d= -f2-)
    line=${line//"\${$v}"/"'$val'"}
    line=${line//"\$$v"/"$val"}
  done
  line=${line//\/usr\/local\/bin\//$bin/}
  line=${line//\/var\/lib\/mat/$tmp/var-lib-mat}
  line=$(echo "$line" | sed -E 's/0\.0\.0\.0:[0-9]+/127.0.0.1:0/g; s/coordinator\.example\.internal:[0-9]+/127.0.0.1:1/g; s/--rendezvous-port [0-9]+/--rendezvous-port 0/g')
  eval "args=($line)"
  mkdir -p "$tmp/var-lib-mat"
  "${args[@]}" >"$tmp/$1.log" 2>&1 &
  pid=$!
  for _ in $(seq 300); do  # at most 30 s for the first log line
    [ -s "$tmp/$1.log" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  sleep 2
  if ! kill -0 "$pid" 2>/dev/null; then
    wait "$pid" && rc=0 || rc=$?
    echo "FAIL $1: ExecStart with $2 exited with $rc within 2 s: ${args[*]}"
    tail -n 5 "$tmp/$1.log"
    fails=$((fails + 1))
    return
  fi
  kill -TERM "$pid"
  wait "$pid" && rc=0 || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "FAIL $1: exit code $rc after SIGTERM (want 0)"
    tail -n 5 "$tmp/$1.log"
    fails=$((fails + 1))
  else
    echo "ok   $1: ExecStart with $2 runs and stops on SIGTERM"
  fi
}
run_execstart mat-coordinator.service coordinator.env
run_execstart mat-worker@.service worker-0.env
if ! grep -Eq '^u mat ' "$units/mat.sysusers.conf"; then
  echo "FAIL mat.sysusers.conf does not create the user mat"
  fails=$((fails + 1))
fi
if [ "$fails" -ne 0 ]; then
  echo "$fails problems"
  exit 1
fi
echo "systemd units ok"
