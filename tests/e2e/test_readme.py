"""The README's examples, run as a reader would run them, against the lab
instead of quay.io; and --dump-plugin, the plugin's own short help,
against its manual.  (tests/unit/test_docs.py checks, without running
anything, that every example passes only parameters the plugin takes.)"""

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import CDI, NBDKIT

ROOT = Path(CDI).parent
PUBLIC_IMAGE = "quay.io/containerdisks/fedora:41"


def example(title):
    """The shell block that follows the README's paragraph **TITLE**."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^\*\*{re.escape(title)}\*\*.*?^```sh\n(.*?)^```", text, re.M | re.S)
    assert match, f"the README has no example {title!r}"
    return match.group(1)


def run_example(script, directory, **replacements):
    """Run SCRIPT in DIRECTORY with bash, from a checkout: ./cdi.py is this
    one, and each key of REPLACEMENTS (a public name) becomes its value."""
    script = script.replace("./cdi.py", CDI)
    for public, ours in replacements.items():
        assert public in script
        script = script.replace(public, ours)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=directory,
                            check=False, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def reader(lab):
    """A reader's working directory, and a cache of their own: every
    start is cold."""
    path = Path(tempfile.mkdtemp(dir=lab.workdir, prefix="reader-"))
    yield path
    shutil.rmtree(path)


@pytest.fixture
def cold_cache(reader, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(reader / "cache"))


def test_the_archive_example_serves_the_disk_of_the_saved_image(three, disk, reader,
                                                                cold_cache):
    run_example(example("An archive."), reader, **{"localhost/mydisk:1": three.name})
    assert (reader / "mydisk.qcow2").read_bytes() == disk[1]


def test_the_copy_example_copies_the_disk_out_of_a_registry(lab, three, disk, reader,
                                                            cold_cache):
    run_example(example("Copy a disk out."), reader,
                **{PUBLIC_IMAGE: f"{lab.registry}/cdi-test/three:1"})
    assert (reader / "fedora.raw").read_bytes() == disk[0]


def test_the_lazy_cold_start_example_answers_qemu_img_info(lab, three, reader, cold_cache):
    result = run_example(example("A lazy cold start."), reader,
                         **{PUBLIC_IMAGE: f"{lab.registry}/cdi-test/three:1"})
    assert "file format: qcow2" in result.stdout


def test_the_boot_example_serves_a_disk_the_vm_can_write(lab, three, reader, cold_cache):
    server = example("Boot it with qemu.").split("\nqemu-system-x86_64")[0]
    # The VM's writes, made by qemu-io instead, and read back through the cow filter.
    server = server.replace("-U /tmp/fedora.sock", "-U -") + (
        " --run 'qemu-io -f qcow2 -c \"write -P 0x55 0 64k\" -c \"read -P 0x55 0 64k\" \"$uri\"'")
    result = run_example(server, reader, **{PUBLIC_IMAGE: f"{lab.registry}/cdi-test/three:1"})
    assert "read 65536/65536 bytes" in result.stdout, result.stdout


def test_dump_plugin_lists_the_parameters_of_the_manual_and_names_it():
    result = subprocess.run([NBDKIT, "python", CDI, "--dump-plugin"], check=True,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=60)
    listed = re.findall(r"^cdi_param_\w+=([a-z-]+)=", result.stdout, re.M)
    manual = (ROOT / "docs" / "nbdkit-cdipy-plugin.pod").read_text()
    items = re.findall(r"^=item B<([a-z-]+)=", manual, re.M)
    assert listed and set(listed) == set(items)
    usage = re.search(r"^cdi_usage=(.*)$", result.stdout, re.M).group(1)
    assert usage.endswith("see nbdkit-cdipy-plugin(1)")
