"""Which file is the VM disk: the one the VM would boot, as KubeVirt finds
it in the image's merged filesystem; and what a disk, or a layer holding
disks, is, in words.

Layers are stacked base first, as podman would mount them: a later layer's
entry replaces an earlier one at the same path, a whiteout (.wh.NAME)
removes NAME and all below it, an opaque whiteout (.wh..wh..opq) empties
its directory of what the layers below put there.  The disk is the one
regular file left under disk/, else the one regular file at the root.
"""

import dataclasses
import os

from .errors import CdiError
from .layer import Member
from .progress import describe_size

OPAQUE = ".wh..wh..opq"
WHITEOUT = ".wh."
QCOW2_MAGIC = b"QFI\xfb"
KIND_NAMES = {"file": ("file", "files"), "directory": ("directory", "directories"),
              "link": ("link", "links"), "whiteout": ("whiteout", "whiteouts"),
              "other": ("other entry", "other entries")}


@dataclasses.dataclass(frozen=True)
class Choice:
    """The disk: MEMBER of layer INDEX; WHY it is the one, in words."""
    index: int
    member: object
    why: str


def choose_disk(layers, image_name):
    """The Choice among LAYERS, [(index, members)] base first; CdiError if
    there is no disk or more than one."""
    files, hidden = merged_files(layers)
    hidden_disks = [f"{shown(path)} of layer {index} ({how} by layer {by})"
                    for path, index, how, by in hidden if is_candidate(path)]
    gone = f"; {', '.join(hidden_disks)}" if hidden_disks else ""
    count = f"{len(layers)} layers" if len(layers) != 1 else "1 layer"
    under_disk = sorted(path for path in files if path.startswith("disk/"))
    at_root = sorted(path for path in files if "/" not in path)
    if len(under_disk) == 1:
        candidates, place = under_disk, "under disk/"
    elif not under_disk and len(at_root) == 1:
        candidates, place = at_root, "at the root, with no disk/"
    else:
        candidates = under_disk or at_root
        if not candidates:
            raise CdiError(f"{image_name}: no VM disk: the merged filesystem of its "
                           f"{count} has no regular file under disk/ nor at the "
                           f"root{gone}")
        listed = ", ".join(f"{shown(path)} (layer {files[path][0]})" for path in candidates)
        raise CdiError(f"{image_name}: {len(candidates)} candidate VM disks: {listed}; "
                       "serve one with layer=N --filter=tar tar-entry=PATH")
    index, member = files[candidates[0]]
    return Choice(index, member,
                  f"the only regular file {place} once the {count} "
                  f"{'are' if len(layers) != 1 else 'is'} merged{gone}")


def merged_files(layers):
    """({path: (index, member)} of the regular files in the merged
    filesystem of LAYERS, [(path, index, how, by index)] of the files a
    later layer replaced or removed)."""
    files = {}
    directories = set()  # that hold, or once held, a file: only their removal scans
    hidden = []

    def remove(path, by, how, below_only=False):
        names = [path] if path in files and not below_only else []
        if path in directories or path == "":
            prefix = f"{path}/" if path else ""
            names += [name for name in files if name.startswith(prefix)]
        for name in names:
            hidden.append((name, files[name][0], how, by))
            del files[name]

    for index, members in layers:
        entries = [(member.name.rstrip("/"), member) for member in members]
        # Whiteouts hide what the layers below hold, whatever their place
        # in this layer's archive.
        for name, _ in entries:
            directory, _, base = name.rpartition("/")
            if base == OPAQUE:
                remove(directory, index, "hidden by an opaque directory", below_only=True)
            elif base.startswith(WHITEOUT):
                target = f"{directory}/{base[len(WHITEOUT):]}" if directory \
                    else base[len(WHITEOUT):]
                remove(target, index, "whited out")
        for name, member in entries:
            if member.kind == "whiteout":
                continue
            if member.kind != "directory":
                remove(name, index, "replaced")
            elif name in files:  # a directory replaces the file, not what is below
                hidden.append((name, files.pop(name)[0], "replaced", index))
            if member.kind == "file":
                files[name] = (index, member)
                parts = name.split("/")[:-1]
                directories.update("/".join(parts[:end]) for end in range(1, len(parts) + 1))
    return files, hidden


def shown(path):
    """PATH as text to show: bytes that are not UTF-8 as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_candidate(path):
    return path.startswith("disk/") or "/" not in path


# ------------------------------------------------------------ in words

def describe_contents(layer):
    """What LAYER (a tar) holds: its disks, with their format, or how many
    entries of each kind."""
    disks = [member for member in layer.members if member.is_disk()]
    if disks:
        return ", ".join(f"{disk.name} ({describe_format(layer, disk)})" for disk in disks)
    counts = {}
    for member in layer.members:
        counts[member.kind] = counts.get(member.kind, 0) + 1
    parts = [f"{number} {KIND_NAMES[kind][number != 1]}"
             for kind, number in sorted(counts.items())]
    return ", ".join(parts) or "empty"


def describe_file(layer):
    """LAYER as one disk file (a blob, a window): its format and size."""
    return describe_format(layer, Member("", "file", layer.size, 0))


def describe_format(layer, member):
    """The format of file MEMBER of LAYER: qcow2 with its virtual size, or raw."""
    head = bytearray(32)
    if member.size >= len(head):
        try:
            layer.read(memoryview(head), member.offset)
        except OSError as error:
            return f"{describe_size(member.size)}, unreadable: {error.strerror}"
        if head[:4] == QCOW2_MAGIC:
            virtual = int.from_bytes(head[24:32], "big")
            return f"qcow2, {describe_size(virtual)} virtual"
    return f"raw, {describe_size(member.size)}"
