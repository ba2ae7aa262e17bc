#!/usr/bin/env bash
# Builds the Debian package, installs it on this machine, and runs the service the way systemd would:
# the unit's ExecStart command line as the unit's user, with the unit's LimitMEMLOCK. Checks /readyz,
# then stops it with SIGTERM and checks that it exits 0. Purges the package (and its user) at the end.
#
# Needs root (dpkg, the service user) and cargo-deb (`cargo install cargo-deb --locked`; installed here
# when missing). No systemd needed: this machine may have none running, so the unit's command line is
# run directly, which is also what checks that the packaged configuration starts.
#
#   deploy/package-test.sh            # build (cargo deb), install, run, stop, purge
#   KEEP=1 deploy/package-test.sh     # leave the package installed
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*"; }
fail() { echo "package-test: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || fail "needs root (dpkg -i, the service user)"
for tool in dpkg curl setpriv; do
  command -v "$tool" >/dev/null || fail "$tool not found (apt-get install dpkg curl util-linux)"
done
if ! cargo deb --version >/dev/null 2>&1; then
  log "installing cargo-deb"
  cargo install cargo-deb --locked
fi

start=$(date +%s)
log "cargo deb"
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
# --fast: lighter compression; this package only lives for the test.
cargo deb -p talkgroup --fast
deb=$(ls -t "$target"/debian/talkgroup_*.deb | head -n 1)
ls -l "$target"/debian/
[ -f "$deb" ] || fail "no package in $target/debian"
built=$(date +%s)
echo "package: $deb ($(du -h "$deb" | cut -f1), built in $((built - start)) s)"
dpkg-deb --info "$deb" | sed -n '/Package:/,$p'
dpkg-deb --contents "$deb"

pid=""
cleanup() {
  [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
  if [ -z "${KEEP:-}" ]; then
    dpkg --purge talkgroup >/dev/null 2>&1 || true
    getent passwd talkgroup >/dev/null && deluser --system --quiet talkgroup >/dev/null 2>&1 || true
    getent group talkgroup >/dev/null && delgroup --system --quiet talkgroup >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

log "dpkg -i"
dpkg -i "$deb"
getent passwd talkgroup >/dev/null || fail "the package did not create the talkgroup user"
[ "$(stat -c '%U:%G %a' /etc/talkgroup/talkgroup.toml)" = "root:talkgroup 640" ] ||
  fail "/etc/talkgroup/talkgroup.toml: $(stat -c '%U:%G %a' /etc/talkgroup/talkgroup.toml), want root:talkgroup 640"
unit=/lib/systemd/system/talkgroup.service
[ -f "$unit" ] || unit=/usr/lib/systemd/system/talkgroup.service
[ -f "$unit" ] || fail "no systemd unit installed"
for line in "User=talkgroup" "CapabilityBoundingSet=" "NoNewPrivileges=yes" "ProtectSystem=strict" \
    "LimitMEMLOCK=infinity" "KillSignal=SIGTERM"; do
  grep -qx "$line" "$unit" || fail "$unit lacks $line"
done
/usr/bin/talkgroup config check /etc/talkgroup/talkgroup.toml >/dev/null ||
  fail "the packaged configuration does not check"

if command -v systemd-analyze >/dev/null; then
  log "systemd-analyze"
  systemd-analyze verify "$unit" 2>&1 | grep -v -e 'Failed to connect' -e 'No such file' || true
  # The exposure score of the unit's sandboxing (0 = locked down, 10 = none); offline: no systemd needed.
  systemd-analyze security --offline=yes "$unit" 2>/dev/null | tail -n 1 || true
fi

log "run the unit's ExecStart as its user"
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
http_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 18099)
logfile=$(mktemp)
chmod 644 "$logfile"
# The environment overrides the packaged file (flags > environment > file): loopback only, free ports,
# so the test cannot collide with anything else on this machine.
(
  # The unit's LimitMEMLOCK=infinity, or as close as this sandbox allows (its hard limit may be lower).
  ulimit -l unlimited 2>/dev/null || ulimit -l "$(ulimit -H -l)"
  echo "RLIMIT_MEMLOCK: $(ulimit -l)"
  export TALKGROUP_HTTP="127.0.0.1:$http_port" TALKGROUP_MEDIA_IP=127.0.0.1 TALKGROUP_MEDIA_PORT=0 \
         TALKGROUP_SHARDS=2 RUST_LOG=info
  # shellcheck disable=SC2086  # ExecStart is a command line
  exec setpriv --reuid=talkgroup --regid=talkgroup --clear-groups --no-new-privs -- $exec_start
) >"$logfile" 2>&1 &
pid=$!
ready=""
for _ in $(seq 1 100); do
  if body=$(curl -fsS "http://127.0.0.1:$http_port/readyz" 2>/dev/null); then
    ready="$body"
    break
  fi
  kill -0 "$pid" 2>/dev/null || { cat "$logfile"; fail "the service exited at start"; }
  sleep 0.1
done
[ "$ready" = ready ] || { cat "$logfile"; fail "/readyz never said ready"; }
echo "/readyz: $ready"
user=$(ps -o user= -p "$pid" | tr -d ' ')
[ "$user" = talkgroup ] || fail "runs as $user, not talkgroup"
metrics=$(curl -fsS "http://127.0.0.1:$http_port/metrics")
grep -q '^talkgroup_build_info' <<<"$metrics" || fail "no metrics"
curl -fsS "http://127.0.0.1:$http_port/healthz" >/dev/null || fail "/healthz"

log "SIGTERM"
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
pid=""
grep -q "draining" "$logfile" || { cat "$logfile"; fail "stopping did not drain"; }
[ "$status" = 0 ] || { cat "$logfile"; fail "exit status $status after SIGTERM, want 0"; }
echo "exit status after SIGTERM: $status"
rm -f "$logfile"

log "package test passed in $(($(date +%s) - start)) s (build $((built - start)) s)"
