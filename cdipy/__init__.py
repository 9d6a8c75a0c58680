"""The core of cdi.py: everything but the nbdkit callbacks.

Nothing here imports nbdkit, so plain pytest can exercise it.  Data flows
one way: parameters -> the signature policy (policy, admission) -> find
the image and the source that serves it (image, sources/) -> fill the
table of exports (exports), which nbdkit reads.  What each module does,
in that order, is the module map of docs/how-it-works.md: the one list
of them.

Messages go to the "cdipy" logger at DEBUG level; cdi.py forwards them to
nbdkit.debug, so they show with nbdkit -v.
"""
