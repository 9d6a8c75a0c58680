"""The floor for make bench: the least a Python plugin can do to serve a
file, one os.preadv per read, in cdi.py's thread model.

  nbdkit python bench/bare.py file=PATH
"""

import os

import nbdkit

API_VERSION = 2
path = None


def config(key, value):
    global path
    if key != "file":
        raise RuntimeError(f"unknown parameter {key!r}: bare.py takes file=PATH")
    path = value


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS


def open(readonly):
    return os.open(path, os.O_RDONLY)


def get_size(fd):
    return os.fstat(fd).st_size


def can_multi_conn(fd):
    return True


def pread(fd, buf, offset, flags):
    os.preadv(fd, [buf], offset)


def close(fd):
    os.close(fd)
