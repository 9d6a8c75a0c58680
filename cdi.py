#!/usr/bin/env -S nbdkit python
# cdi.py: an nbdkit plugin that exports the VM disk of a container image
# or OCI artifact, and the layers of the image.
#
# It pulls IMAGE with podman (unless it is already in local storage) and
# serves each of its layers, an uncompressed tar archive, read-only over NBD:
# in place from podman's storage when it can, from a copy made with
# "podman save" when it must.  An OCI artifact (an ORAS disk, a KubeVirt VM
# export), or an archive, is copied with skopeo into the cache instead, and
# its blobs served from there.  The export "disk" is the VM disk file itself,
# the one the VM would boot, whatever its shape; layer=disk makes it the
# default (layer=N, or auto, a layer).  On nbdkit >= 1.36:
#
#   nbdkit python ./cdi.py name=quay.io/kubevirt/cirros-container-disk-demo \
#          layer=disk --filter=qcow2dec
#
# name= must be spelled out: Python plugins have no magic config key.  Run
# "nbdkit python ./cdi.py --dump-plugin" for every parameter, and read
# nbdkit-cdipy-plugin(1) (docs/nbdkit-cdipy-plugin.pod) for what they do.
#
# This file is only the face nbdkit sees: its callbacks, in the order nbdkit
# calls them, hand the work to the cdipy package, which knows nothing of
# nbdkit.  The shebang runs it as "./cdi.py name=IMAGE ..." where nbdkit is
# /usr/bin (Debian) or /usr/sbin (Fedora).

import errno
import logging
import os
import sys
import traceback

import nbdkit

# The package beside this file's real path (a checkout, or reached through a
# symlink); once installed, it is on Python's path.
HERE = os.path.dirname(os.path.realpath(__file__))
if os.path.isdir(os.path.join(HERE, "cdipy")):
    sys.path.insert(0, HERE)

from cdipy.errors import CdiError, NoSuchExport  # noqa: E402
from cdipy.layer import DATA, HOLE, ZERO  # noqa: E402
from cdipy.parameters import MANUAL, PARAMETERS, Settings  # noqa: E402
from cdipy.startup import prepare  # noqa: E402

API_VERSION = 2
EXTENT_FLAGS = {DATA: 0, HOLE: nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO, ZERO: nbdkit.EXTENT_ZERO}

settings = Settings()  # filled by config
exports = None         # the running plugin's whole state, from get_ready on


class NbdkitDebug(logging.Handler):
    """The core's messages, shown with nbdkit -v."""

    def emit(self, record):
        nbdkit.debug(record.getMessage())


core_log = logging.getLogger("cdipy")
core_log.addHandler(NbdkitDebug())
core_log.setLevel(logging.DEBUG)
core_log.propagate = False

# nbdkit-python-plugin formats every exception raised by a callback with
# traceback.format_exception.  For a CdiError the traceback only hides the
# message, so give nbdkit the message alone.
format_exception = traceback.format_exception


def format_exception_for_nbdkit(exc, *args, **kwargs):
    value = args[0] if args else exc
    if isinstance(value, CdiError):
        return [for_nbdkit(str(value))]
    return format_exception(exc, *args, **kwargs)


def for_nbdkit(text):
    """TEXT as UTF-8 can hold it: a file name from an image may hold bytes
    that are not UTF-8 (surrogate escapes), and nbdkit-python-plugin
    crashes on a string it cannot encode."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


traceback.format_exception = format_exception_for_nbdkit


def dump_plugin():
    print("cdi_usage=nbdkit python cdi.py name=IMAGE [layer=N|auto|disk] [key=value ...]; "
          f"see {MANUAL}")
    for key, text in PARAMETERS.items():
        print(f"cdi_param_{key.replace('-', '_')}={key}={text}")
    print("cdi_env_TMPDIR=where temporary data goes (default /var/tmp)")
    # nbdkit exits without flushing Python's stdout.
    sys.stdout.flush()


def config(key, value):
    settings.set(key, value)


def config_complete():
    settings.check_complete()


# Reads on one connection are serialized; connections run in parallel.
# Measured here: os.preadv under SERIALIZE_REQUESTS reads at ~1.0x of
# "nbdkit file", under PARALLEL at ~0.75x (the GIL on 2 cores).
def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS


# The heavy work, once, before nbdkit forks and before any client connects.
def get_ready():
    global exports
    exports = prepare(settings)


def after_fork():
    exports.build_in_background()


def list_exports(readonly, is_tls):
    return [(name, for_nbdkit(description)) for name, description in exports.listing()]


def default_export(readonly, is_tls):
    return exports.default_name


def open(readonly):
    try:
        return exports.open(nbdkit.export_name())
    except NoSuchExport:
        nbdkit.set_error(errno.ENOENT)
        raise
    except CdiError:
        nbdkit.set_error(errno.EIO)
        raise


def export_description(layer):
    return for_nbdkit(layer.description)


def get_size(layer):
    return layer.size


def is_rotational(layer):
    return False


def can_multi_conn(layer):
    return True


def can_write(layer):
    return False


def can_extents(layer):
    return True


def can_cache(layer):
    return nbdkit.CACHE_NATIVE


def pread(layer, buf, offset, flags):
    try:
        layer.read(buf, offset)
    except OSError as error:
        raise data_error(layer, "reading", offset, error) from None


def extents(layer, count, offset, flags):
    try:
        runs = layer.extents(offset, count, first_only=flags & nbdkit.FLAG_REQ_ONE)
    except OSError as error:
        raise data_error(layer, "mapping", offset, error) from None
    return [(start, length, EXTENT_FLAGS[kind]) for start, length, kind in runs]


# The files behind a layer are regular files: let the kernel prefetch.
def cache(layer, count, offset, flags):
    layer.prefetch(offset, count)


def cleanup():
    if exports is not None:
        exports.close()


def data_error(layer, doing, offset, error):
    """The CdiError for a failed data callback; the client sees its errno."""
    nbdkit.set_error(error.errno or errno.EIO)
    if layer.failure:
        return CdiError(layer.failure)
    return CdiError(f"{doing} layer {layer.index} at offset {offset}: "
                    f"{error.strerror or error}")
