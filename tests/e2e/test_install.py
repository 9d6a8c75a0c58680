"""The two ways to run the plugin: from a checkout (also through a symlink)
and installed by make install, where the package is on Python's path and
the manual in man1."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import CDI, NBDKIT

REPO = Path(CDI).parent


@pytest.fixture
def scratch(lab):
    path = Path(tempfile.mkdtemp(dir=lab.workdir, prefix="install-"))
    yield path
    shutil.rmtree(path)


def serve_size(script, three, env=None):
    """nbdkit python SCRIPT serving THREE; the size nbdinfo reads, or the error."""
    result = subprocess.run(
        [NBDKIT, "-U", "-", "python", str(script), f"name={three.name}",
         "--run", 'nbdinfo --size "$uri"'],
        check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def test_checkout_runs_through_a_symlink(three, scratch):
    link = scratch / "elsewhere" / "nbdkit-cdipy-plugin"
    link.parent.mkdir()
    link.symlink_to(CDI)
    assert serve_size(link, three) == serve_size(CDI, three)


def test_installed_plugin_finds_the_package_on_pythons_path(three, scratch):
    subprocess.run(["make", "-C", str(REPO), "--no-print-directory", "install",
                    f"DESTDIR={scratch}"], check=True, capture_output=True, timeout=60)
    plugins = list(scratch.rglob("nbdkit-cdipy-plugin"))
    packages = list(scratch.rglob("cdipy/exports.py"))
    assert len(plugins) == 1 and len(packages) == 1
    assert os.access(plugins[0], os.X_OK)
    assert not (plugins[0].parent / "cdipy").exists()
    env = dict(os.environ, PYTHONPATH=str(packages[0].parent.parent))
    assert serve_size(plugins[0], three, env=env) == serve_size(CDI, three)


def test_script_runs_by_its_shebang(three):
    result = subprocess.run(
        [CDI, f"name={three.name}", "-U", "-", "--run", 'nbdinfo --size "$uri"'],
        check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        env=dict(os.environ, PATH=f"{Path(NBDKIT).parent}:{os.environ['PATH']}"),
        timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == serve_size(CDI, three)


def test_install_puts_the_manual_where_man_finds_it_and_uninstall_removes_it(scratch):
    make = ["make", "-C", str(REPO), "--no-print-directory", f"DESTDIR={scratch}"]
    subprocess.run([*make, "install"], check=True, capture_output=True, timeout=60)
    pages = list(scratch.rglob("man1/nbdkit-cdipy-plugin.1"))
    assert [page.relative_to(scratch).parts[-4:] for page in pages] == [
        ("share", "man", "man1", "nbdkit-cdipy-plugin.1")]
    env = dict(os.environ, MANWIDTH="80", MANPATH=str(pages[0].parents[1]))
    rendered = subprocess.run(["man", "--warnings", "-l", str(pages[0])], check=True,
                              capture_output=True, text=True, env=env, timeout=60)
    assert rendered.stderr == ""
    assert "nbdkit-cdipy-plugin - export the VM disk and layers of a container" \
        in " ".join(rendered.stdout.split())
    assert max(len(line) for line in rendered.stdout.splitlines()) <= 80
    by_name = subprocess.run(["man", "nbdkit-cdipy-plugin"], check=True,
                             capture_output=True, text=True, env=env, timeout=60)
    assert by_name.stdout == rendered.stdout
    subprocess.run([*make, "uninstall"], check=True, capture_output=True, timeout=60)
    assert not pages[0].exists()
    assert list(scratch.rglob("nbdkit-cdipy-plugin*")) == []
