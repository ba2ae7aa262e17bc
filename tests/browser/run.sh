#!/usr/bin/env bash
# Real-browser test of the web PTT page (called by .ci/run): builds the server, then runs it and headless
# Chromium inside a private network namespace (`unshare -n`, loopback only), so nothing leaves 127.0.0.1.
# The server checks tokens (a random --auth-key; the members' tokens minted with `talkgroup token`) and
# records every burst (--record in a temporary directory).
# Needs: chromium (apt-get install -y chromium), node + npm. Screenshot: $TARGET/browser/ptt.png.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
out="$repo/target/browser"
mkdir -p "$out"

if ! command -v chromium >/dev/null; then
  apt-get install -y chromium >/dev/null || { apt-get update -qq && apt-get install -y chromium >/dev/null; }
fi
if [ ! -d "$here/node_modules/playwright-core" ]; then
  (cd "$here" && npm ci --no-audit --no-fund --silent)
fi
(cd "$repo" && cargo build --quiet --bin talkgroup)

bin="$target/debug/talkgroup"

# Resolved: Chromium does not read a capture file whose path has `..` in it (the microphone is then silent).
wav="$(realpath -m "$repo/../shared/data/speech-48k-mono.wav")"
[ -f "$wav" ] || wav=""
port=18080
log="$out/server.log"
rec="$(mktemp -d)"
trap 'rm -rf "$rec"' EXIT
# A key for this run only; alice may talk and make emergency calls in web-*, bob (the dispatcher) in
# web-ptt and also read the history and recordings (admin); carol may talk in web-ptt.
export TALKGROUP_AUTH_KEY="test-$(od -An -tx8 -N16 /dev/urandom | tr -d ' \n')"
TG_TOKEN_ALICE="$("$bin" token --sub alice --channel 'web-*' --talk --emergency --ttl 10m)"
TG_TOKEN_BOB="$("$bin" token --sub bob --channel web-ptt --talk --emergency --admin --ttl 10m)"
TG_TOKEN_CAROL="$("$bin" token --sub carol --channel web-ptt --talk --ttl 10m)"
export TG_TOKEN_ALICE TG_TOKEN_BOB TG_TOKEN_CAROL
# Inside the namespace: loopback up, the server in the background, the test, then stop the server.
unshare -n sh -c '
  ip link set lo up
  "$1" serve --http 127.0.0.1:$2 --media-ip 127.0.0.1 --media-port 41000 --shards 2 --no-pin \
    --record "$7" >"$3" 2>&1 &
  srv=$!
  for i in $(seq 1 100); do
    if node -e "fetch(\"http://127.0.0.1:$2/healthz\").then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"; then break; fi
    sleep 0.1
  done
  TALKGROUP_TEST_WAV="$4" node "$5/ptt.mjs" "http://127.0.0.1:$2" "$6"
  rc=$?
  kill -TERM $srv; wait $srv
  exit $rc
' sh "$bin" "$port" "$log" "$wav" "$here" "$out" "$rec" || rc=$?
rm -rf "$out"/profile-* "$out/recordings"
cp -r "$rec" "$out/recordings" # what the server recorded, for a look after a failure
[ "${rc:-0}" -eq 0 ] && echo "screenshot: $out/ptt.png"
exit "${rc:-0}"
