"""The core of cdi.py: everything but the nbdkit callbacks.

Nothing here imports nbdkit, so plain pytest can exercise it.  Modules, in
the order data flows through them:

  startup       start-up, top down: parameters -> find the image -> choose
                the source -> fill the table
  parameters    the key=value parameters, checked one by one
  workspace     a private directory in TMPDIR, the programs started in it,
                and their removal however we end (the guardian)
  podman        running podman and skopeo, and what their errors mean
  image         finding the image by the pull policy: podman's storage, its
                artifact store, the cache, or a pull
  oci/          registries and OCI layouts: fetch (what to read from the
                registry ourselves; podman artifact pull, skopeo copy),
                registry (the HTTP client), chunks (a blob as it is
                read), stream (a gzip layer as it streams in), layout (the
                cache's, podman's artifact store), blobs (a blob as a
                layer, checked; gzip unpacked once)
  sources/      each way of getting layers, behind one interface:
                storage (in place), saved (the copy path), layout (blobs),
                registry (blobs as they are read), stream (an image's
                layers as they stream in)
  storage       podman's storage: layers.json, tar-split, the map of a
                layer and its cached copy, files opened beneath a layer
  userns        files a rootless user can't open, opened in podman's user
                namespace by userns_helper (run with podman unshare)
  save          the copy path's stream: a layer copied from podman save
  sparse        zero blocks: found as data goes by, left as holes
  layer         a layer as an offset map (read, extents, members), and a
                Window onto one of its files
  disk          which file is the VM disk, and what a disk is in words
  cache         the private cache directory: entries, leftovers
  verify        checking a layer against its digest, and remembering it
  exports       the table of exports nbdkit reads: by name, the default,
                listing, open; each export pending, ready or failed
  progress      sizes for people, progress lines
  errors        the two kinds of failure raised on purpose

Messages go to the "cdipy" logger at DEBUG level; cdi.py forwards them to
nbdkit.debug, so they show with nbdkit -v.
"""
