#!/bin/bash
# The reference for time to ready and disk: what nbdkit's C cdi plugin
# (1.32) does before it serves, then "nbdkit file" serving the layer.
#
#   baseline.sh NAME LAYER SOCKET
#
# The C plugin's script is: podman pull; podman save --format oci-dir to a
# directory in TMPDIR; jq finds the layer in manifest.json; mv the layer
# out; rm -rf the directory.  podman 4.3's oci-dir has no manifest.json,
# so this saves a docker-dir, which has one, and is otherwise the same.
# The kept layer is $TMPDIR/imageXXXXXX/layer; the bench removes it.
set -euo pipefail
name=$1 layer=$2 socket=$3
work=$(mktemp -d "${TMPDIR:-/var/tmp}/imageXXXXXX")
podman pull --quiet "$name" >/dev/null
podman save --quiet --format docker-dir -o "$work/image" "$name"
digest=$(jq -r ".layers[$layer].digest" < "$work/image/manifest.json")
mv "$work/image/${digest#sha256:}" "$work/layer"
rm -rf "$work/image"
exec nbdkit -f -v -D nbdkit.backend.datapath=0 --exit-with-parent -U "$socket" \
    file "$work/layer"
