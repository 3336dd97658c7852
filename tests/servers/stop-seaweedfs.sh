#!/usr/bin/env bash
# stop-seaweedfs.sh DIR -- stop exactly the weed process whose PID is in DIR/weed.pid
set -u
DIR=$(cd "${1:?usage: $0 DIR}" && pwd)
PID=$(cat "$DIR/weed.pid" 2>/dev/null || echo none)
# guard against PID reuse: only signal it if it is still our weed binary
if [ -r /proc/$PID/cmdline ] && tr '\0' ' ' </proc/$PID/cmdline | grep -q "weed .*mini -dir=$DIR/data"; then
  kill -TERM "$PID"   # graceful shutdown (took 3.5-12 s in tests)
  for _ in $(seq 300); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$PID" 2>/dev/null; then
    echo "SIGTERM timeout (30s), sending SIGKILL"; kill -KILL "$PID"
    while kill -0 "$PID" 2>/dev/null; do sleep 0.1; done
  fi
  echo "stopped pid $PID"
else
  echo "pid $PID is not our weed (already gone)"
fi
# weed hard-codes gRPC unix sockets /tmp/seaweedfs-<svc>-grpc-<port>.sock; remove
# any of OURS (by port) left behind, unless something is listening on it again
[ -f "$DIR/weed.env" ] && . "$DIR/weed.env"
for p in ${WEED_PORTS:-}; do for s in /tmp/seaweedfs-*-grpc-$p.sock; do
  [ -S "$s" ] && [ -z "$(ss -xlH "src $s")" ] && rm -f "$s" && echo "removed stale $s"
done; done
rm -f "$DIR/weed.pid"
