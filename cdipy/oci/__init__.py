"""OCI image layouts: where artifacts and archives are read from.

  fetch   getting an artifact or an archive into a layout: podman artifact
          pull into podman's artifact store, skopeo copy into the cache
  layout  the layouts: the cache's (CACHE/oci) and podman's artifact store
  blobs   a layout's blobs as layers, each checked against its digest; a
          gzip blob unpacked once into the cache
"""
