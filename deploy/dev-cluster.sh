#!/usr/bin/env bash
# A replicated Strata on one machine, for trying it out: 3 etcd members and
# 2 stratad replicas on loopback.
#
#   deploy/dev-cluster.sh start     # start everything, print the addresses
#   deploy/dev-cluster.sh status    # what runs where
#   deploy/dev-cluster.sh stop      # stop everything (data is kept)
#   deploy/dev-cluster.sh clean     # stop and delete the data
#
# Data, logs and pid files live in $STRATA_DEV_CLUSTER_DIR (default
# ./dev-cluster). Ports: etcd clients 2379, 22379, 32379 (peers 2380, 22380,
# 32380), stratad 7071 and 7072; set STRATA_DEV_PORT_OFFSET to shift them
# all. stratad is target/debug/stratad (built when missing) unless
# $STRATAD_BIN names another; etcd is /usr/bin/etcd (Debian etcd-server)
# unless $ETCD_BIN names another.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${STRATA_DEV_CLUSTER_DIR:-./dev-cluster}
OFFSET=${STRATA_DEV_PORT_OFFSET:-0}
ETCD=${ETCD_BIN:-/usr/bin/etcd}
STRATAD=${STRATAD_BIN:-target/debug/stratad}
PREFIX=/strata/
# A config write carries its value twice (the layer and its history
# version), so etcd's default request limit (1.5 MiB) would refuse values
# near stratad's 1 MiB limits.max_value_bytes.
MAX_REQUEST_BYTES=$((3 * 1024 * 1024))

ETCD_NAMES=(etcd-1 etcd-2 etcd-3)
ETCD_CLIENT=($((2379 + OFFSET)) $((22379 + OFFSET)) $((32379 + OFFSET)))
ETCD_PEER=($((2380 + OFFSET)) $((22380 + OFFSET)) $((32380 + OFFSET)))
STRATAD_NAMES=(stratad-1 stratad-2)
STRATAD_PORT=($((7071 + OFFSET)) $((7072 + OFFSET)))

endpoints() {
  local list=() port
  for port in "${ETCD_CLIENT[@]}"; do list+=("http://127.0.0.1:$port"); done
  (IFS=,; echo "${list[*]}")
}

running() { # name -> 0 when its recorded process is alive
  local pidfile="$DIR/$1.pid"
  [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

port_busy() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Polls `curl URL` until its output contains WANT, at most ~30 s.
wait_for() {
  local url=$1 want=$2 what=$3 i
  for i in $(seq 1 150); do
    case "$(curl -fsS --max-time 1 "$url" 2>/dev/null || true)" in
      *"$want"*) return 0 ;;
    esac
    sleep 0.2
  done
  echo "error: $what did not come up; see its log in $DIR" >&2
  return 1
}

start() {
  [ -x "$ETCD" ] || { echo "error: etcd not found at $ETCD (apt-get install etcd-server)" >&2; exit 1; }
  if [ ! -x "$STRATAD" ]; then
    echo "==> building stratad"
    cargo build -q --bin stratad
  fi
  mkdir -p "$DIR"
  local i cluster=""
  for i in 0 1 2; do
    cluster+="${cluster:+,}${ETCD_NAMES[$i]}=http://127.0.0.1:${ETCD_PEER[$i]}"
  done
  for i in 0 1 2; do
    local name=${ETCD_NAMES[$i]}
    if running "$name"; then echo "$name already running"; continue; fi
    for port in "${ETCD_CLIENT[$i]}" "${ETCD_PEER[$i]}"; do
      if port_busy "$port"; then echo "error: port $port is in use" >&2; exit 1; fi
    done
    local state=new
    [ -d "$DIR/$name.etcd" ] && state=existing
    nohup "$ETCD" --name "$name" --data-dir "$DIR/$name.etcd" \
      --listen-client-urls "http://127.0.0.1:${ETCD_CLIENT[$i]}" \
      --advertise-client-urls "http://127.0.0.1:${ETCD_CLIENT[$i]}" \
      --listen-peer-urls "http://127.0.0.1:${ETCD_PEER[$i]}" \
      --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER[$i]}" \
      --initial-cluster "$cluster" --initial-cluster-token strata-dev-cluster \
      --initial-cluster-state "$state" --logger zap --log-level warn \
      --max-request-bytes "$MAX_REQUEST_BYTES" \
      >>"$DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$DIR/$name.pid"
  done
  for i in 0 1 2; do
    wait_for "http://127.0.0.1:${ETCD_CLIENT[$i]}/health" '"health":"true"' "${ETCD_NAMES[$i]}"
  done
  for i in 0 1; do
    local name=${STRATAD_NAMES[$i]}
    if running "$name"; then echo "$name already running"; continue; fi
    if port_busy "${STRATAD_PORT[$i]}"; then
      echo "error: port ${STRATAD_PORT[$i]} is in use" >&2; exit 1
    fi
    # etcd here takes 3 MiB requests, so the replicas keep the 1 MiB value
    # limit of the embedded store (on a default etcd it is 512 KiB).
    # Tokens live in etcd: whichever replica creates the first admin token
    # writes it to the one file both are given.
    STRATA_ETCD_PREFIX=$PREFIX STRATA_LIMITS_MAX_VALUE_BYTES=1048576 nohup "$STRATAD" \
      --listen "127.0.0.1:${STRATAD_PORT[$i]}" --data-dir "$DIR/$name" \
      --admin-token-file "$DIR/admin.token" \
      --etcd-endpoints "$(endpoints)" >>"$DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$DIR/$name.pid"
  done
  for i in 0 1; do
    wait_for "http://127.0.0.1:${STRATAD_PORT[$i]}/readyz" ready "${STRATAD_NAMES[$i]}"
  done
  status
  cat <<EOF

Admin token: $DIR/admin.token (valid on both replicas: tokens live in etcd)

Try:
  export STRATA_TOKEN=\$(cat $DIR/admin.token)
  curl -s -H "authorization: Bearer \$STRATA_TOKEN" -XPUT localhost:${STRATAD_PORT[0]}/v1/projects/vega/tenants/integration
  curl -s -H "authorization: Bearer \$STRATA_TOKEN" localhost:${STRATAD_PORT[1]}/v1/projects/vega/tenants
  cargo run -q --bin strata -- --endpoints http://127.0.0.1:${STRATAD_PORT[0]},http://127.0.0.1:${STRATAD_PORT[1]} --project vega tenant list
EOF
}

stop_one() { # name -> SIGTERM, then SIGKILL after 10 s
  local name=$1 pidfile="$DIR/$1.pid" i
  [ -f "$pidfile" ] || return 0
  local pid
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "$name did not stop within 10 s; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    echo "stopped $name"
  fi
  rm -f "$pidfile"
}

stop() {
  [ -d "$DIR" ] || { echo "nothing to stop ($DIR does not exist)"; return 0; }
  local name
  for name in "${STRATAD_NAMES[@]}" "${ETCD_NAMES[@]}"; do stop_one "$name"; done
}

status() {
  local i state
  for i in 0 1 2; do
    state=stopped
    if running "${ETCD_NAMES[$i]}"; then
      state=running
      case "$(curl -fsS --max-time 1 "http://127.0.0.1:${ETCD_CLIENT[$i]}/metrics" 2>/dev/null || true)" in
        *$'\n'"etcd_server_is_leader 1"*) state="running, leader" ;;
      esac
    fi
    printf '%-10s http://127.0.0.1:%-6s %s\n' "${ETCD_NAMES[$i]}" "${ETCD_CLIENT[$i]}" "$state"
  done
  for i in 0 1; do
    state=stopped
    if running "${STRATAD_NAMES[$i]}"; then
      state=running
      curl -fsS --max-time 1 "http://127.0.0.1:${STRATAD_PORT[$i]}/readyz" >/dev/null 2>&1 \
        && state="running, ready"
    fi
    printf '%-10s http://127.0.0.1:%-6s %s\n' "${STRATAD_NAMES[$i]}" "${STRATAD_PORT[$i]}" "$state"
  done
  echo "etcd endpoints: $(endpoints)  (key prefix $PREFIX; data and logs in $DIR)"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  clean) stop; rm -rf "$DIR"; echo "removed $DIR" ;;
  *) echo "usage: $0 start|stop|status|clean" >&2; exit 64 ;;
esac
