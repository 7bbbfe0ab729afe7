#!/usr/bin/env bash
# Builds the project's two container images without a Docker engine or a registry (there
# is neither on the development machine), as OCI image layouts in tar archives that
# `ctr images import` takes and names:
#   <out>/sdfleet.oci.tar         localhost/sdfleet:dev, the Dockerfile's final stage: the
#                                 cargo-built binary (stripped, as the Dockerfile does), the
#                                 glibc libraries `ldd` lists (the host is Debian bookworm,
#                                 the Dockerfile's base), the CA bundle, user 65532:65532;
#   <out>/comfyui-double.oci.tar  localhost/comfyui-double:dev, the tests' ComfyUI double
#                                 (examples/fake_comfyui.rs) where the operator's Deployment
#                                 expects ComfyUI: port 8188, /app/ComfyUI/{models,output}.
# tests/image.rs checks the first against the Dockerfile. Layers are reproducible (sorted
# tar, fixed times and owners, `gzip -n`), so a rerun with unchanged binaries writes the
# same digests and skips the compression: a warm run takes seconds.
#
# scripts/image.sh [--out DIR] [--release] [--import CONTAINERD_SOCKET]
#   --out DIR       where the archives go (default ~/.cache/sdfleet/images)
#   --release       build and use the release binaries (default: debug)
#   --import ADDR   then `ctr --address ADDR -n k8s.io images import` both
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sdfleet/target}
umask 022

out=$HOME/.cache/sdfleet/images
profile=debug
import=
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=${2:?--out takes a directory}; shift 2 ;;
    --release) profile=release; shift ;;
    --import) import=${2:?--import takes a containerd socket}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
# One run at a time per output directory: two would rebuild the same roots and layers.
exec 9>"$out/.lock"
flock 9

# What cargo sets for a crate's own process, when a test runs this script: ring's build
# script reruns when these change, and most of the build after it. Cargo sets them itself
# wherever a build needs them.
for v in $(compgen -e); do
  case $v in
    CARGO_MANIFEST_* | CARGO_PKG_* | CARGO_CRATE_NAME | CARGO_BIN_* | CARGO_PRIMARY_PACKAGE | \
      CARGO_TARGET_TMPDIR | CARGO_RUSTC_CURRENT_DIR | OUT_DIR) unset "$v" ;;
  esac
done
release=()
[ $profile = release ] && release=(--release)
# A no-op when the binaries are fresh.
"${CARGO:-cargo}" build --locked "${release[@]}" --bin sdfleet --example fake_comfyui
bin_dir=$CARGO_TARGET_DIR/$profile
# Byte order for `ls` below (after the build: cargo's environment stays the caller's).
export LC_ALL=C
version=$(awk -F'"' '/^\[/ { p = ($0 == "[package]") } p && /^version *=/ { print $2; exit }' Cargo.toml)
case $(uname -m) in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  *) arch=$(uname -m) ;;
esac
EPOCH=1970-01-01T00:00:00Z
# Deterministic archives: the same files give the same bytes, hence the same digests.
TAR=(tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner --format=gnu)

# mirror ROOTFS PATH: the host's PATH at the same place in ROOTFS; links stay links (the
# loader's /lib64 link, sonames), followed to the file they name, which is copied.
mirror() {
  local root=$1 dir path target
  dir=$(readlink -f "$(dirname "$2")")
  path=$dir/$(basename "$2")
  mkdir -p "$root$dir"
  if [ -L "$path" ]; then
    target=$(readlink "$path")
    ln -sfn "$target" "$root$path"
    case $target in /*) ;; *) target=$dir/$target ;; esac
    mirror "$root" "$target"
  else
    cp "$path" "$root$path"
  fi
}

# base ROOTFS USER BINARY DEST: a fresh root with Debian's merged-/usr links, /tmp, the
# user 65532 as `useradd --no-create-home` leaves it (group of the same id), and BINARY
# (stripped) at DEST with the shared libraries it loads.
base() {
  local root=$1 user=$2 binary=$3 dest=$4 lib
  rm -rf "$root"
  mkdir -p "$root"/{etc,tmp,usr/local/bin}
  chmod 1777 "$root/tmp"
  for lib in bin sbin lib lib64; do
    if [ -L "/$lib" ]; then
      ln -s "$(readlink "/$lib")" "$root/$lib"
      mkdir -p "$root/$(readlink -f "/$lib")"
    fi
  done
  printf '%s\n' 'root:x:0:0:root:/root:/usr/sbin/nologin' \
    'nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin' \
    "$user:x:65532:65532::/nonexistent:/usr/sbin/nologin" >"$root/etc/passwd"
  printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' "$user:x:65532:" >"$root/etc/group"
  strip -o "$root$dest" "$binary"
  chmod 0755 "$root$dest"
  # `ldd` lines: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and the loader's
  # `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file.
  for lib in $(ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
    mirror "$root" "$lib"
  done
}

# layout NAME REF ROOTFS CONFIG_JSON: <out>/NAME.oci.tar, an OCI layout of one gzip layer
# (ROOTFS) and an image config whose `config` is CONFIG_JSON, named REF.
layout() {
  local name=$1 ref=$2 rootfs=$3 image_config=$4
  local work=$out/.work/$name diff layer_size config config_digest manifest manifest_digest
  mkdir -p "$work"
  (cd "$rootfs" && "${TAR[@]}" -cf "$work/layer.tar" $(ls -A))
  diff=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
  # Compress only a changed layer (the slow step); the last one is kept beside its diff id.
  if [ ! -f "$work/layer.tar.gz" ] || [ "$(cat "$work/layer.diffid" 2>/dev/null)" != "$diff" ]; then
    gzip -n -c "$work/layer.tar" >"$work/layer.tar.gz.tmp"
    mv "$work/layer.tar.gz.tmp" "$work/layer.tar.gz"
    echo "$diff" >"$work/layer.diffid"
  fi
  rm -rf "$work/layer.tar" "$rootfs"
  local layer_digest
  layer_digest=$(sha256sum "$work/layer.tar.gz" | cut -d' ' -f1)
  layer_size=$(stat -c %s "$work/layer.tar.gz")
  config=$(jq -cn --arg arch "$arch" --arg created "$EPOCH" --arg diff "sha256:$diff" \
    --argjson config "$image_config" \
    '{created: $created, architecture: $arch, os: "linux", config: $config,
      rootfs: {type: "layers", diff_ids: [$diff]},
      history: [{created: $created, created_by: "scripts/image.sh"}]}')
  config_digest=$(printf '%s' "$config" | sha256sum | cut -d' ' -f1)
  manifest=$(jq -cn --arg c "sha256:$config_digest" --argjson cs "${#config}" \
    --arg l "sha256:$layer_digest" --argjson ls "$layer_size" \
    '{schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs},
      layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $l, size: $ls}]}')
  manifest_digest=$(printf '%s' "$manifest" | sha256sum | cut -d' ' -f1)
  if [ -f "$out/$name.oci.tar" ] && [ "$(cat "$work/manifest.digest" 2>/dev/null)" = "$manifest_digest" ]; then
    echo "$ref: unchanged, $out/$name.oci.tar (manifest sha256:$manifest_digest)"
    return
  fi
  local dir=$work/layout
  rm -rf "$dir"
  mkdir -p "$dir/blobs/sha256"
  printf '%s' "$config" >"$dir/blobs/sha256/$config_digest"
  printf '%s' "$manifest" >"$dir/blobs/sha256/$manifest_digest"
  ln "$work/layer.tar.gz" "$dir/blobs/sha256/$layer_digest"
  printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$dir/oci-layout"
  # ref.name as a full reference: `ctr images import` then names the image REF (a bare
  # tag would get an `import-<date>` prefix).
  jq -cn --arg d "sha256:$manifest_digest" --argjson s "${#manifest}" --arg ref "$ref" --arg arch "$arch" \
    '{schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
      manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $d, size: $s,
        annotations: {"org.opencontainers.image.ref.name": $ref},
        platform: {architecture: $arch, os: "linux"}}]}' | tr -d '\n' >"$dir/index.json"
  "${TAR[@]}" -C "$dir" -cf "$out/$name.oci.tar.tmp" blobs index.json oci-layout
  mv "$out/$name.oci.tar.tmp" "$out/$name.oci.tar"
  rm -rf "$dir"
  echo "$manifest_digest" >"$work/manifest.digest"
  echo "$ref: $out/$name.oci.tar (manifest sha256:$manifest_digest)"
}

labels() { # TITLE DESCRIPTION: the OCI labels, as the Dockerfile's LABEL sets them
  jq -cn --arg t "$1" --arg d "$2" --arg v "$version" \
    '{"org.opencontainers.image.title": $t, "org.opencontainers.image.description": $d,
      "org.opencontainers.image.version": $v}'
}
PATH_ENV='PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'

# sdfleet: the Dockerfile's final stage (tests/image.rs holds them to agree).
rootfs=$out/.work/sdfleet/rootfs
base "$rootfs" sdfleet "$bin_dir/sdfleet" /usr/local/bin/sdfleet
mirror "$rootfs" /etc/ssl/certs/ca-certificates.crt
layout sdfleet localhost/sdfleet:dev "$rootfs" "$(jq -cn --arg path "$PATH_ENV" \
  --argjson labels "$(labels sdfleet 'Kubernetes operator for GPU Stable Diffusion (ComfyUI) fleets: controller and node agent')" \
  '{User: "65532:65532", Env: [$path], Entrypoint: ["/usr/local/bin/sdfleet"], Cmd: ["controller"],
    Labels: $labels}')"

# The ComfyUI double: models mount read-only over the empty models directory; output is
# world-writable (sticky, as /tmp) for any pod user when no volume is mounted there.
rootfs=$out/.work/comfyui-double/rootfs
base "$rootfs" comfyui "$bin_dir/examples/fake_comfyui" /usr/local/bin/fake_comfyui
mkdir -p "$rootfs/app/ComfyUI/models" "$rootfs/app/ComfyUI/output"
chmod 1777 "$rootfs/app/ComfyUI/output"
layout comfyui-double localhost/comfyui-double:dev "$rootfs" "$(jq -cn --arg path "$PATH_ENV" \
  --argjson labels "$(labels comfyui-double 'The ComfyUI test double of sdfleet (tests/support/fake_comfyui.rs), for the testbed')" \
  '{User: "65532:65532", Env: [$path], Entrypoint: ["/usr/local/bin/fake_comfyui"],
    Cmd: ["--listen", "0.0.0.0", "--port", "8188"], WorkingDir: "/app/ComfyUI",
    ExposedPorts: {"8188/tcp": {}}, Labels: $labels}')"

if [ -n "$import" ]; then
  for name in sdfleet comfyui-double; do
    ctr --address "$import" -n k8s.io images import "$out/$name.oci.tar"
  done
fi
