#!/usr/bin/env bash
# Start (or stop) a Docker engine for the container tests, where none runs:
#   scripts/docker/engine.sh start   installs Debian's docker.io and debootstrap if missing
#                                     (root on Debian, as CI is) and starts dockerd with the vfs
#                                     storage driver; a running engine is left as it is
#   scripts/docker/engine.sh stop    stops the engine `start` started (and only that one)
# Without root or apt, it says so and exits 0: the container tests then skip.
set -uo pipefail
pidfile=/run/tuneship-dockerd.pid
log=/tmp/tuneship-dockerd.log
docker=$(command -v /usr/bin/docker || command -v docker || echo docker)

answers() { "$docker" info >/dev/null 2>&1; }

start() {
  if answers; then echo "docker engine: already running"; return 0; fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "docker engine: none runs, and starting one needs root on Debian: container tests skip"
    return 0
  fi
  if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    echo "docker engine: installing docker.io and debootstrap (Debian packages) ..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q docker.io debootstrap >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q docker.io debootstrap >/dev/null; } \
      || { echo "docker engine: could not install docker.io: container tests skip"; return 0; }
    docker=$(command -v /usr/bin/docker || command -v docker)
  fi
  dockerd --storage-driver=vfs --pidfile "$pidfile" >"$log" 2>&1 &
  for _ in $(seq 60); do
    if answers; then echo "docker engine: started (dockerd, vfs storage; log $log)"; return 0; fi
    sleep 1
  done
  echo "docker engine: dockerd did not answer within 60 s (log $log): container tests skip"
}

stop() {
  [ -f "$pidfile" ] || return 0
  kill "$(cat "$pidfile")" 2>/dev/null
  for _ in $(seq 30); do [ -f "$pidfile" ] || break; sleep 1; done
  echo "docker engine: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
