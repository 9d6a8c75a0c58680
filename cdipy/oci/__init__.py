"""Registries and OCI image layouts: where artifacts, archives and cold
images are read from.

  fetch     what to read from the registry ourselves (an artifact of
            uncompressed blobs, an image of gzip layers), else getting it
            into a layout: podman artifact pull into podman's artifact
            store, skopeo copy into the cache
  registry  the registry over HTTP: manifests, blob ranges and streams,
            with podman's credentials and TLS settings
  chunks    an uncompressed blob served as it is read, a chunk at a time
  stream    a gzip layer served as it streams in, decompressed into the
            cache
  layout    the layouts: the cache's (CACHE/oci) and podman's artifact store
  blobs     a layout's blobs as layers, each checked against its digest; a
            gzip blob unpacked once into the cache
"""
