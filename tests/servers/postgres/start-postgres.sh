#!/bin/bash
# start-postgres.sh DIR -- a throw-away PostgreSQL (Debian's postgresql package) on 127.0.0.1,
# its data, socket and log in DIR, one database "glance" (user glance, password glance).
# Runs as the `postgres` user (the server refuses root). Writes DIR/pg.env (PG_URL, PG_PID,
# PG_PID_START); stop it with stop-postgres.sh DIR.
set -euo pipefail
DIR=$(mkdir -p "$1" && cd "$1" && pwd)
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$BIN/postgres" ] || { echo "no PostgreSQL server (apt-get install postgresql)" >&2; exit 1; }
PORT=${PG_PORT:-$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')}
RUN=()
[ "$(id -u)" = 0 ] && { chown postgres "$DIR"; RUN=(runuser -u postgres --); }
"${RUN[@]}" "$BIN/initdb" -D "$DIR/data" -U postgres -A trust > "$DIR/initdb.log" 2>&1 \
  || { tail -20 "$DIR/initdb.log" >&2; exit 1; }
# Two glance-api nodes with a few task threads each: well under the default 100 connections.
"${RUN[@]}" "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/postgres.log" -w -t 60 \
  -o "-h 127.0.0.1 -p $PORT -k $DIR -c fsync=off -c synchronous_commit=off" start >/dev/null
PID=$(head -1 "$DIR/data/postmaster.pid")
"${RUN[@]}" "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -q -v ON_ERROR_STOP=1 \
  -c "CREATE USER glance PASSWORD 'glance'" -c "CREATE DATABASE glance OWNER glance" >/dev/null
START=$(sed 's/.*) //' "/proc/$PID/stat" | cut -d' ' -f20)
cat > "$DIR/pg.env" <<EOT
PG_URL=postgresql+psycopg2://glance:glance@127.0.0.1:$PORT/glance
PG_PORT=$PORT
PG_PID=$PID
PG_PID_START=$START
EOT
echo "postgresql://127.0.0.1:$PORT/glance"
