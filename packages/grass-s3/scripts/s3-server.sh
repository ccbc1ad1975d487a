#!/usr/bin/env bash
# s3-server.sh - a real S3 server on 127.0.0.1 for tests: a throwaway single-node Ceph
# (one mon, one OSD on memstore, radosgw with the beast frontend) inside one directory,
# without systemd or root.
#
#   s3-server.sh start DIR   DIR must be new or empty. Starts the cluster in DIR, waits until
#                            radosgw answers HTTP, creates an S3 user, writes DIR/env and
#                            prints the same lines on stdout (logs go to stderr):
#                              S3_ENDPOINT=http://127.0.0.1:PORT
#                              S3_REGION=us-east-1
#                              S3_ACCESS_KEY_ID=...
#                              S3_SECRET_ACCESS_KEY=...
#                            Every PID it starts is recorded in DIR/pids ("PID NAME" lines).
#   s3-server.sh stop DIR    TERM, then KILL after S3_SERVER_STOP_WAIT seconds (default 3),
#                            only the PIDs in DIR/pids whose command line still names DIR;
#                            then removes DIR.
#
# Optional environment:
#   S3_SERVER_OWNER_PID  stop the server when this process is gone (a watchdog for test
#                        runners that die by SIGKILL before their exit handlers run)
#   S3_SERVER_OSD_BYTES  memstore capacity; objects live in the OSD's RAM (default 1 GiB)
#   S3_SERVER_TIMEOUT    seconds to wait for each step (default 60)
#   S3_SERVER_KEEP=1     on a failed start or a stop, keep DIR (logs) instead of removing it
#
# Needs (Debian): apt-get install --no-install-recommends ceph-mon ceph-osd radosgw ceph-common
#
# The recipe (memstore OSD, auth none, msgr2 only on loopback, rgw's "ms mon client mode =
# crc") follows /work/shared/s3/ceph-s3.sh, itself a pared-down Ceph vstart.sh.
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
ACCESS_KEY=pasture-test-access-key
SECRET_KEY=pasture-test-secret-key-0123456789
BINARIES="ceph-mon ceph-osd radosgw radosgw-admin ceph monmaptool ceph-authtool"

log() { echo "[s3-server] $(date +%T.%3N) $*" >&2; }
usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }

# ours PID: PID is alive and its command line names $DIR (guards against a recycled PID).
ours() { [[ -r /proc/$1/cmdline ]] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -e "$DIR/" -e "$DIR "; }

# stop_pids: stop every recorded process but this one, newest first (watchdog, rgw, osd,
# mon): each daemon shuts down in milliseconds while the ones it talks to are still up, but
# waits for time-outs when they are not. SIGKILL after S3_SERVER_STOP_WAIT seconds each.
stop_pids() {
  [[ -f $DIR/pids ]] || return 0
  local pid name deadline
  tac "$DIR/pids" | while read -r pid name; do
    [[ $pid != "$$" ]] && ours "$pid" || continue
    kill -TERM "$pid" 2>/dev/null || continue
    deadline=$(($(date +%s%N) + ${S3_SERVER_STOP_WAIT:-3} * 1000000000))
    while ours "$pid" && (($(date +%s%N) < deadline)); do sleep 0.02; done
    if ours "$pid"; then
      log "$name (pid $pid) still running ${S3_SERVER_STOP_WAIT:-3}s after SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      # not our child (or already reaped), so poll until SIGKILL has taken effect
      for _ in $(seq 100); do ours "$pid" || break; sleep 0.02; done
    fi
  done
}

# remove_dir: remove DIR, but only if it looks like one of ours.
remove_dir() {
  [[ ${S3_SERVER_KEEP:-0} == 1 ]] && { log "kept $DIR"; return 0; }
  [[ -f $DIR/pids ]] && rm -rf -- "$DIR"
}

cmd_stop() {
  [[ -f $DIR/pids ]] || { log "nothing to stop in $DIR"; return 0; }
  stop_pids
  remove_dir
  log "stopped"
}

# cmd_watch OWNER: the watchdog started by `start` when S3_SERVER_OWNER_PID is set.
cmd_watch() {
  while kill -0 "$1" 2>/dev/null; do sleep 1; done
  log "owner pid $1 is gone; stopping"
  cmd_stop
}

# --- start -------------------------------------------------------------------------------

READY=0
on_exit() {
  ((READY)) && return 0
  log "start failed; the logs end so (S3_SERVER_KEEP=1 keeps them in $DIR):"
  local f
  for f in "$DIR"/log/*; do [[ -s $f ]] && { echo "--- tail $f" >&2; tail -n 8 "$f" >&2; }; done
  stop_pids
  remove_dir
}
die() { log "ERROR: $*"; exit 1; }

# Ports: read /proc/net/tcp{,6} instead of probing. A port is picked at random in
# 10000-31999, below the kernel's ephemeral range (32768+), so outgoing connections do not
# take it between the check and the bind.
port_hex() { printf '%04X' "$1"; }
port_used() { grep -qE "^ *[0-9]+: [0-9A-F]+:$(port_hex "$1") " /proc/net/tcp /proc/net/tcp6 2>/dev/null; }
listening() { grep -qE "^ *[0-9]+: [0-9A-F]+:$(port_hex "$1") [0-9A-F]+:[0-9A-F]+ 0A " /proc/net/tcp /proc/net/tcp6 2>/dev/null; }
pick_port() {
  local p
  for _ in $(seq 500); do
    p=$((10000 + RANDOM % 22000))
    [[ $p != "${MON_PORT:-}" ]] && ! port_used "$p" && { echo "$p"; return 0; }
  done
  die "no free port found in 10000-31999"
}

# spawn NAME CMD...: run a daemon in the foreground (-f) in the background, detached from
# our stdio, and record its PID.
spawn() {
  local name=$1
  shift
  "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 &
  echo "$! $name" >>"$DIR/pids"
  log "started $name (pid $!)"
}

# wait_for DESC CMD...: poll CMD until it succeeds; fail fast if a recorded daemon died.
wait_for() {
  local desc=$1 end=$(($(date +%s) + ${S3_SERVER_TIMEOUT:-60})) pid name
  shift
  until "$@" >/dev/null 2>&1; do
    while read -r pid name; do
      kill -0 "$pid" 2>/dev/null || die "$name (pid $pid) exited while waiting for $desc"
    done <"$DIR/pids"
    (($(date +%s) < end)) || die "timed out after ${S3_SERVER_TIMEOUT:-60}s waiting for $desc"
    sleep 0.1
  done
}

http_ok() { (exec 3<>"/dev/tcp/127.0.0.1/$RGW_PORT" && printf 'GET / HTTP/1.0\r\n\r\n' >&3 && head -c 12 <&3 | grep -q '^HTTP/'); }
osd_up() { "${CEPH[@]}" osd dump 2>/dev/null | grep -q '^osd\.0 up'; }

cmd_start() {
  local missing="" b t0 ms conf fsid osd_uuid osd_id
  for b in $BINARIES; do command -v "$b" >/dev/null || missing+=" $b"; done
  [[ -z $missing ]] || { log "ERROR: missing$missing (apt-get install --no-install-recommends ceph-mon ceph-osd radosgw ceph-common)"; exit 1; }
  mkdir -p "$DIR"
  [[ -z $(ls -A "$DIR") ]] || { log "ERROR: $DIR is not empty"; exit 1; }
  trap on_exit EXIT
  trap 'exit 1' INT TERM HUP # so that on_exit runs on a signal too
  t0=$(date +%s%N)

  MON_PORT=$(pick_port)
  RGW_PORT=$(pick_port)
  fsid=$(cat /proc/sys/kernel/random/uuid)
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  conf=$DIR/ceph.conf
  CEPH=(ceph -c "$conf" --connect-timeout 10)
  mkdir -p "$DIR"/{run,log,crash,mon.a,osd.0,rgw}
  : >"$DIR/pids"

  # Every daemon names $conf on its command line; `ours` relies on it.
  cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$MON_PORT]
public addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
keyring = $DIR/keyring
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
crash dir = $DIR/crash
log to stderr = false
err to stderr = false
# one OSD: size-1 pools, replicas chosen among OSDs rather than hosts, no health nagging
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
# commit map changes (rgw creates its pools at start) every 50 ms instead of every 1 s
paxos propose interval = 0.05
# the mon refuses to start when its disk is under 5% free; a test tmpfs may well be
mon data avail warn = 2
mon data avail crit = 1
# small: fewer messenger and OSD worker threads than the defaults (3; 5-8 shards)
ms async op threads = 2
osd op num shards = 1
osd op num threads per shard = 2
# loopback only: no CRC over message payloads between rgw and the OSD; it saves the daemons
# about a tenth of their CPU while Pasture uploads, CPU the benchmarks share with Pasture
ms crc data = false

[mon]
mon data = $DIR/\$name

[osd]
osd data = $DIR/\$name
osd objectstore = memstore
memstore device bytes = ${S3_SERVER_OSD_BYTES:-1073741824}

[client.rgw]
# radosgw asks for a secure mon connection by default, which auth 'none' cannot offer
ms mon client mode = crc
rgw frontends = beast endpoint=127.0.0.1:$RGW_PORT
rgw data = $DIR/rgw
rgw thread pool size = 16
rgw dynamic resharding = false
# no lifecycle threads: they sleep 5 s between lock attempts and so delay shutdown by 5 s
rgw enable lc threads = false
# free the data of deleted or overwritten objects (RAM, with memstore) after ~30 s, not 2 h
rgw gc obj min wait = 30
rgw gc processor period = 30
EOF

  # mon
  monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$MON_PORT]" "$DIR/monmap" >/dev/null
  ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$DIR/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' >/dev/null
  ceph-mon -c "$conf" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/keyring" >>"$DIR/log/mkfs.out" 2>&1 ||
    die "ceph-mon --mkfs failed"
  spawn mon.a ceph-mon -c "$conf" -i a -f
  wait_for "the mon" "${CEPH[@]}" mon stat

  # osd
  osd_id=$("${CEPH[@]}" osd new "$osd_uuid")
  [[ $osd_id == 0 ]] || die "expected osd id 0, got '$osd_id'"
  ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$DIR/log/mkfs.out" 2>&1 ||
    die "ceph-osd --mkfs failed"
  spawn osd.0 ceph-osd -c "$conf" -i 0 -f
  wait_for "osd.0 up" osd_up

  # radosgw: it creates its pools, then listens
  spawn rgw radosgw -c "$conf" -n client.rgw -f
  wait_for "radosgw on 127.0.0.1:$RGW_PORT" listening "$RGW_PORT"
  wait_for "radosgw answering HTTP" http_ok
  radosgw-admin -c "$conf" user create --uid=test --display-name="test user" \
    --access-key="$ACCESS_KEY" --secret="$SECRET_KEY" >"$DIR/log/user-create.json" 2>>"$DIR/log/radosgw-admin.out" ||
    die "radosgw-admin user create failed"

  if [[ -n ${S3_SERVER_OWNER_PID:-} ]]; then
    spawn watch bash "$SELF" watch "$DIR" "$S3_SERVER_OWNER_PID"
  fi

  cat >"$DIR/env" <<EOF
S3_ENDPOINT=http://127.0.0.1:$RGW_PORT
S3_REGION=us-east-1
S3_ACCESS_KEY_ID=$ACCESS_KEY
S3_SECRET_ACCESS_KEY=$SECRET_KEY
EOF
  READY=1
  ms=$((($(date +%s%N) - t0) / 1000000))
  log "ready in ${ms}ms: S3 on 127.0.0.1:$RGW_PORT, mon on :$MON_PORT, dir $DIR"
  cat "$DIR/env"
}

(($# >= 2)) || usage
DIR=$(readlink -m -- "$2")
[[ $DIR != / ]] || usage
case $1 in
start) cmd_start ;;
stop) cmd_stop ;;
watch) cmd_watch "$3" ;;
*) usage ;;
esac
