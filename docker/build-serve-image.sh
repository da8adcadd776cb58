#!/usr/bin/env bash
# Build the serving image (docker/serve.Dockerfile) from the repository root, with whichever builder works:
# docker (a running daemon), else podman, else buildah.
#
#   docker/build-serve-image.sh                     # tag stage-trainer-serve:0.1.0, base debian:bookworm-slim
#   IMAGE=myreg/serve:1 docker/build-serve-image.sh
#   BUILDER=buildah docker/build-serve-image.sh      # force one builder
#   MAKE_BASE=1 docker/build-serve-image.sh         # no Docker Hub: make a Debian bookworm base with
#                                                   # debootstrap first (root; apt-get install debootstrap)
#   BASE_IMAGE=localhost/debian-base:bookworm docker/build-serve-image.sh   # a base made earlier
#   CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt docker/build-serve-image.sh  # pip behind a TLS-intercepting
#                                                   # proxy: the host's CA file, as a build secret (no layer keeps it)
#
# Needs the llama-cpp-python wheel in .cache/wheels (`make install-export` builds it once).
# podman/buildah: BUILDAH_ISOLATION=chroot (no nested user namespaces needed), --network host (RUN steps
# reach the apt and pip mirrors of the host), --format docker (keeps HEALTHCHECK, which OCI images drop).
# STORAGE_DRIVER=vfs where overlay is not available (inside another container).
set -euo pipefail

cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-stage-trainer-serve:0.1.0}"
BASE_IMAGE="${BASE_IMAGE:-debian:bookworm-slim}"
LLAMA_WHEEL="${LLAMA_WHEEL:-llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
ROOTFS="${ROOTFS:-${TMPDIR:-/tmp}/debian-bookworm-rootfs}"

if [ ! -f ".cache/wheels/$LLAMA_WHEEL" ]; then
  echo "error: .cache/wheels/$LLAMA_WHEEL is missing: run 'make install-export' first (builds it once, ~6 min on 2 cores)" >&2
  exit 2
fi

pick_builder() {
  if [ -n "${BUILDER:-}" ]; then echo "$BUILDER"; return; fi
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then echo docker; return; fi
  if command -v podman >/dev/null 2>&1; then echo podman; return; fi
  if command -v buildah >/dev/null 2>&1; then echo buildah; return; fi
  echo "error: no container builder: install docker (with a running daemon), podman or buildah" >&2
  exit 2
}
builder="$(pick_builder)"

storage=()
if [ -n "${STORAGE_DRIVER:-}" ] && [ "$builder" != docker ]; then storage=(--storage-driver "$STORAGE_DRIVER"); fi

# A Debian bookworm base made locally, for machines that cannot pull from Docker Hub: debootstrap's minbase,
# trimmed like debian:bookworm-slim (no apt lists, docs, man pages), with the security and updates suites.
if [ "${MAKE_BASE:-0}" = 1 ]; then
  BASE_IMAGE=localhost/debian-base:bookworm
  if [ ! -x "$ROOTFS/bin/bash" ]; then
    debootstrap --variant=minbase bookworm "$ROOTFS" "$DEBIAN_MIRROR"
  fi
  cat > "$ROOTFS/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} bookworm-security main
EOF
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
    'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \
    > "$ROOTFS/etc/dpkg/dpkg.cfg.d/slim"
  rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/*.deb \
    "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* "$ROOTFS"/usr/share/locale/*
  find "$ROOTFS/usr/share/doc" -mindepth 2 ! -name copyright -delete 2>/dev/null || true
  case "$builder" in
    docker) tar -C "$ROOTFS" -c . | docker import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" ;;
    *) tar -C "$ROOTFS" -c . | podman "${storage[@]}" import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" ;;
  esac
fi

args=(-f docker/serve.Dockerfile -t "$IMAGE"
      --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "LLAMA_WHEEL=$LLAMA_WHEEL")
# CA_BUNDLE: a CA file for pip inside the build (a TLS-intercepting proxy), mounted as a build secret only.
if [ -n "${CA_BUNDLE:-}" ]; then args+=(--secret "id=ca_bundle,src=$CA_BUNDLE"); fi
echo "building $IMAGE with $builder (base $BASE_IMAGE)" >&2
start=$SECONDS
case "$builder" in
  docker)
    # BuildKit reads docker/serve.Dockerfile.dockerignore (only the files the image needs are sent).
    DOCKER_BUILDKIT=1 docker build "${args[@]}" . ;;
  podman)
    BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}" podman "${storage[@]}" build --format docker --network host \
      --ignorefile docker/serve.Dockerfile.dockerignore "${args[@]}" . ;;
  buildah)
    BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}" buildah "${storage[@]}" build --format docker --network host \
      --ignorefile docker/serve.Dockerfile.dockerignore "${args[@]}" . ;;
  *) echo "error: unknown BUILDER=$builder (docker, podman or buildah)" >&2; exit 2 ;;
esac
echo "built $IMAGE in $(( SECONDS - start ))s with $builder" >&2
