"""Registries and OCI image layouts: where artifacts, archives and cold
images are read from: fetch, registry, chunks, stream, layout, blobs (each
described in the module map of docs/how-it-works.md).
"""
