#!/bin/bash
# make demo: build a small KubeVirt-style containerdisk image, serve it
# with cdi.py and look at its VM disk: the disk export, and through the tar
# filter.
#
# Everything happens in a private podman storage under a temporary
# directory, removed at the end: your own images are not touched.
set -euo pipefail
cdi="$(cd "$(dirname "$0")/.." && pwd)/cdi.py"
work="$(mktemp -d /var/tmp/cdi-demo.XXXXXX)"
trap 'podman rmi --all --force >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

cat > "$work/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$work/graph"
runroot = "$work/run"
[storage.options.overlay]
skip_mount_home = "true"
CONF
printf '[engine]\ntmp_dir = "%s/libpod"\nevents_logger = "none"\n' "$work" > "$work/containers.conf"
export CONTAINERS_STORAGE_CONF="$work/storage.conf" CONTAINERS_CONF="$work/containers.conf"
export TMPDIR="$work/tmp" XDG_CACHE_HOME="$work/cache"
mkdir "$TMPDIR" "$work/context"

show() { printf '\n$ %s\n' "$*"; "$@"; }

# A 1 GiB qcow2 disk, laid out the way KubeVirt expects: disk/downloaded.
qemu-img create -q -f qcow2 "$work/context/disk.qcow2" 1G
printf 'FROM scratch\nADD --chmod=0440 disk.qcow2 /disk/downloaded\n' > "$work/context/Containerfile"
show podman build --quiet -t localhost/cdi-demo/containerdisk:latest "$work/context"

show nbdkit -U - python "$cdi" name=localhost/cdi-demo/containerdisk:latest \
    --run 'nbdinfo --list "$uri"'
show nbdkit -U - python "$cdi" name=localhost/cdi-demo/containerdisk:latest layer=disk \
    --run 'nbdinfo "$uri"; qemu-img info "$uri"'
show nbdkit -U - python "$cdi" name=localhost/cdi-demo/containerdisk:latest \
    layer=auto --filter=tar tar-entry=disk/downloaded --run 'qemu-img info "$uri"'
printf '\nThe demo image lived in %s, now removed.\n' "$work"
