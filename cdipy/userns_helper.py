"""The helper of userns.py, run as "podman unshare python3 -m
cdipy.userns_helper FD": for each request on the socket FD (the lengths of a directory and of
a file's path beneath it, then both), open the file following no symlink
and send back its descriptor, or the errno.  Exits when the socket closes."""

import errno
import os
import socket
import struct
import sys

from cdipy import storage


def serve(connection):
    stream = connection.makefile("rb")
    while True:
        header = stream.read(8)
        if len(header) != 8:
            return
        root_length, name_length = struct.unpack("!II", header)
        root, name = stream.read(root_length), stream.read(name_length)
        if len(name) != name_length:
            return
        try:
            fd = open_beneath(root, name.split(b"/"))
        except OSError as error:
            connection.sendall(struct.pack("!I", error.errno or errno.EIO))
            continue
        try:
            socket.send_fds(connection, [struct.pack("!I", 0)], [fd])
        finally:
            os.close(fd)


def open_beneath(root, parts):
    if not parts or any(part in (b"", b".", b"..") for part in parts):
        raise OSError(errno.EINVAL, "unsafe name")
    directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return storage.open_beneath(directory, parts)
    finally:
        os.close(directory)


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])))
