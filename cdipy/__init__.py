"""The core of cdi.py: everything but the nbdkit callbacks.

Nothing here imports nbdkit, so plain pytest can exercise it.  Modules, in
the order data flows through them:

  parameters  the key=value parameters, checked one by one
  workspace   a private directory in TMPDIR, and its removal however we end
  podman      running podman, and what its errors mean to the user
  image       finding the image: local storage, or a pull
  storage     podman's storage: layers.json, tar-split, files beneath a layer
  userns      files a rootless user can't open, opened in podman's user
              namespace by a helper (unshared.py, run with podman unshare)
  save        the copy path: a layer streamed from "podman save"
  layer       a layer as an offset map: segments, read, extents, members
  cache       the private cache directory: check records and maps
  verify      checking a layer against its diffID, and remembering it
  exports     the set of exports: built, pending, failed, and the default

Messages go to the "cdipy" logger at DEBUG level; cdi.py forwards them to
nbdkit.debug, so they show with nbdkit -v.
"""
