#!/usr/bin/env bash
# `make demo`: the main job end to end on a local default image.
#   1. builds the nginx:latest look-alike (debootstrap + umoci, cached) and pushes it to a local registry
#   2. xbuild localhost:5000/library/nginx:latest      (pull, flatten, minimize, init, kernel -> out/nginx)
#   3. xbuild run out/nginx -p 8080:80                 (boots it under QEMU), GET http://127.0.0.1:8080/
#   4. stops the guest gracefully (nginx gets SIGQUIT) and shows what happened
set -euo pipefail
cd "$(dirname "$0")/.."
XB=.venv/bin/xbuild PY=.venv/bin/python WORK=.work/demo PORT=${DEMO_PORT:-8080}
mkdir -p "$WORK"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "nginx look-alike image (built once with debootstrap + umoci, then cached)"
layout=$($PY -m tests.fixtures.images nginx)
echo "$layout"

say "local registry on 127.0.0.1:5000 (Debian's docker-registry)"
started_registry=""
if ! curl -sf http://127.0.0.1:5000/v2/ >/dev/null; then
  mkdir -p "$WORK/registry"
  sed "s|rootdirectory: .*|rootdirectory: $PWD/$WORK/registry/data|" scripts/registry.yml > "$WORK/registry/config.yml"
  docker-registry serve "$WORK/registry/config.yml" > "$WORK/registry/log" 2>&1 &
  started_registry=$!
  for _ in $(seq 100); do curl -sf http://127.0.0.1:5000/v2/ >/dev/null && break; sleep 0.1; done
fi
skopeo copy -q --dest-tls-verify=false "oci:$layout:nginx" docker://localhost:5000/library/nginx:latest
echo "pushed localhost:5000/library/nginx:latest"

say "xbuild localhost:5000/library/nginx:latest -o out/nginx"
$XB localhost:5000/library/nginx:latest -o out/nginx

say "xbuild run out/nginx -p $PORT:80"
$XB run out/nginx -p "$PORT:80" > "$WORK/console.log" 2> "$WORK/run.log" &
run=$!
cleanup() {
  kill -TERM "$run" 2>/dev/null || true
  wait "$run" 2>/dev/null || true
  [ -z "$started_registry" ] || kill "$started_registry" 2>/dev/null || true
}
trap cleanup EXIT
ok=""
for _ in $(seq 240); do
  if page=$(curl -sf -m 2 "http://127.0.0.1:$PORT/"); then ok=1; break; fi
  kill -0 "$run" 2>/dev/null || break
  sleep 0.5
done
cat "$WORK/console.log"
[ -n "$ok" ] || { echo "nginx did not answer on 127.0.0.1:$PORT"; cat "$WORK/run.log"; exit 1; }
say "GET http://127.0.0.1:$PORT/"
echo "$page"

say "stopping the guest (SIGTERM to xbuild run: nginx gets its StopSignal, SIGQUIT)"
kill -TERM "$run"
status=0; wait "$run" || status=$?
trap - EXIT
[ -z "$started_registry" ] || kill "$started_registry" 2>/dev/null || true
cat "$WORK/console.log" | tail -n 3
cat "$WORK/run.log"
echo "xbuild run exited with $status"
grep -q "xbuild: exec" "$WORK/console.log"
