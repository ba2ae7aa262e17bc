#!/usr/bin/env bash
# Real-browser test of the web PTT page (called by .ci/run): builds the server, then runs it and headless
# Chromium inside a private network namespace (`unshare -n`, loopback only), so nothing leaves 127.0.0.1.
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

# Resolved: Chromium does not read a capture file whose path has `..` in it (the microphone is then silent).
wav="$(realpath -m "$repo/../shared/data/speech-48k-mono.wav")"
[ -f "$wav" ] || wav=""
port=18080
log="$out/server.log"
# Inside the namespace: loopback up, the server in the background, the test, then stop the server.
unshare -n sh -c '
  ip link set lo up
  "$1" serve --http 127.0.0.1:$2 --media-ip 127.0.0.1 --media-port 41000 --shards 2 --no-pin >"$3" 2>&1 &
  srv=$!
  for i in $(seq 1 100); do
    if node -e "fetch(\"http://127.0.0.1:$2/healthz\").then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"; then break; fi
    sleep 0.1
  done
  TALKGROUP_TEST_WAV="$4" node "$5/ptt.mjs" "http://127.0.0.1:$2" "$6"
  rc=$?
  kill -TERM $srv; wait $srv
  exit $rc
' sh "$target/debug/talkgroup" "$port" "$log" "$wav" "$here" "$out" || rc=$?
rm -rf "$out"/profile-*
[ "${rc:-0}" -eq 0 ] && echo "screenshot: $out/ptt.png"
exit "${rc:-0}"
