"""The manual, nbdkit-cdipy-plugin(1), against the code it describes: every
parameter is an =item and every =item a parameter; every environment
variable the package reads is under ENVIRONMENT VARIABLES.  The variables
are found in the source itself, so that a new one without docs fails here."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from cdipy.parameters import MANUAL, PARAMETERS

ROOT = Path(__file__).resolve().parents[2]
POD = ROOT / "docs" / "nbdkit-cdipy-plugin.pod"
SOURCES = sorted([ROOT / "cdi.py", *(ROOT / "cdipy").rglob("*.py")])

# A literal name read from the environment: os.environ.get("X"),
# os.environ["X"], os.getenv("X").
READ = re.compile(r"""os\.(?:environ\.get\(|environ\[|getenv\()\s*["'](\w+)["']""")
# The environment passed on whole to a child, a variable or two replaced.
PASSED_ON = re.compile(r"dict\(os\.environ\b")
# Reads hidden inside the standard library, and the variables they read.
INDIRECT = {
    "os.path.expanduser(": {"HOME"},
    "urllib.request.getproxies(": {"https_proxy", "http_proxy", "no_proxy"},
}


def section(name):
    """The text of the manual's =head1 NAME, up to the next =head1."""
    text = POD.read_text()
    match = re.search(rf"^=head1 {name}\n(.*?)(?=^=head1 |\Z)", text, re.M | re.S)
    assert match, f"the manual has no {name} section"
    return match.group(1)


def environment_read_by_the_package():
    names = set()
    for path in SOURCES:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            found = READ.findall(code)
            names.update(found)
            for call, variables in INDIRECT.items():
                if call in code:
                    names.update(variables)
            if re.search(r"\benviron\b|getenv", code) and not found \
                    and not PASSED_ON.search(code):
                pytest.fail(f"{path.relative_to(ROOT)}:{number} reads the environment "
                            f"in a way this test cannot name: {line.strip()}")
    return names


def test_every_parameter_is_an_item_of_the_manual_and_the_reverse():
    items = set(re.findall(r"^=item B<([a-z-]+)=", section("PARAMETERS"), re.M))
    assert items == set(PARAMETERS)


def test_every_environment_variable_read_is_in_the_manual():
    documented = set(re.findall(r"C<(\w+)>", "\n".join(
        line for line in section("ENVIRONMENT VARIABLES").splitlines()
        if line.startswith("=item"))))
    read = environment_read_by_the_package()
    assert {"TMPDIR", "XDG_CACHE_HOME", "REGISTRY_AUTH_FILE",
            "CONTAINERS_REGISTRIES_CONF"} <= read
    assert read - documented == set()


def test_the_manual_is_the_page_the_errors_name():
    assert f"{POD.stem}(1)" == MANUAL
    assert section("NAME").strip() == (
        "nbdkit-cdipy-plugin - export the VM disk and layers of a container image")


def test_the_manual_has_nbdkits_sections_in_order():
    headings = re.findall(r"^=head1 (.+)$", POD.read_text(), re.M)
    assert headings == ["NAME", "SYNOPSIS", "DESCRIPTION", "EXAMPLES", "PARAMETERS",
                        "EXPORTS", "SEEKABLE LAYERS", "SIGNATURE POLICY",
                        "ENVIRONMENT VARIABLES", "FILES", "ROOTLESS", "LIMITATIONS",
                        "SECURITY", "VERSION", "SEE ALSO", "AUTHORS", "COPYRIGHT"]


def test_the_manuals_lines_fit_76_columns_outside_verbatim_text():
    long = [(number, line) for number, line in enumerate(POD.read_text().splitlines(), 1)
            if len(line) > 76 and not line.startswith((" ", "\t"))]
    assert long == []


def test_podchecker_finds_nothing():
    result = subprocess.run(["podchecker", "-warnings", "-warnings", str(POD)],
                            capture_output=True, text=True, check=False)
    # Debian 12's podchecker says so on stderr, Debian 13's on stdout.
    said = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, said
    assert said == f"{POD} pod syntax OK.", said


def test_the_module_map_names_every_module_of_the_package():
    text = (ROOT / "docs" / "how-it-works.md").read_text()
    table = text[text.index("## The module map"):]
    table = table[:table.index("\n## ", 1)]
    modules = [str(path.relative_to(ROOT / "cdipy")) for path in (ROOT / "cdipy").rglob("*.py")
               if path.name != "__init__.py"]
    missing = sorted(module for module in modules if f"`{module}`" not in table)
    assert missing == [], "add a row for each to the module map of docs/how-it-works.md"


# ------------------------------------------------------------- the README

README = ROOT / "README.md"
# Parameters of the filters the README's examples use, not the plugin's.
FILTER_PARAMETERS = {"tar-entry"}


def readme_commands():
    """Each command line of the README's shell blocks, continuations joined."""
    blocks = re.findall(r"^```sh\n(.*?)^```", README.read_text(), re.M | re.S)
    return [line.split("#", 1)[0].strip() for block in blocks
            for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_readme_is_a_front_door_of_at_most_1500_words():
    assert len(README.read_text().split()) <= 1500


def test_the_readmes_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    used = {word for command in readme_commands()
            for word in re.findall(r"\bmake ([a-z][a-z-]*)", command)}
    assert {"demo", "check"} <= used
    assert used - targets == set()


def test_the_readmes_examples_pass_only_parameters_the_plugin_takes():
    used = set()
    for command in readme_commands():
        if "cdi.py" in command or " cdipy " in command:
            words = shlex.split(command)
            used |= {word.split("=", 1)[0] for word in words
                     if re.fullmatch(r"[a-z][a-z-]*=.*", word)}
    assert "name" in used and "layer" in used
    assert used - set(PARAMETERS) - FILTER_PARAMETERS == set()
