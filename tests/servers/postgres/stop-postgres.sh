#!/bin/bash
# stop-postgres.sh DIR -- stop the PostgreSQL start-postgres.sh DIR started, by its pid.
set -u
DIR=$(cd "$1" && pwd) || exit 1
[ -f "$DIR/pg.env" ] || { echo "no $DIR/pg.env" >&2; exit 1; }
. "$DIR/pg.env"
ours() { local f; f=($(sed 's/.*) //' /proc/$PG_PID/stat 2>/dev/null)) || return 1; [ "${f[19]}" = "$PG_PID_START" ]; }
ours || { echo "postgres pid $PG_PID not running; nothing killed"; exit 0; }
kill -INT "$PG_PID"   # fast shutdown
for i in $(seq 100); do ours || break; sleep 0.1; done
ours && kill -KILL "$PG_PID"
echo "stopped postgres pid $PG_PID"
