"""Bad input, property-based: hostile values for every parameter.

Each value is either rejected while nbdkit reads its configuration, with
one message naming its key and no podman run, or accepted and handed to
podman only as the operand after "--" or joined to its option as
--key=value.  Nothing goes through a shell; nothing is left in TMPDIR.

podman (and skopeo, for artifacts and archives) here is conftest's
recording fake, first in PATH.  A test double is the point of these tests: what they check
is the argv podman would be given, which only a stand-in can record.  It
says "no" to "image exists" and fails every other command at once, so one
example costs one short nbdkit run.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, configuration, event, given, settings
from hypothesis import strategies as st

from conftest import CDI, FAKE_ERROR, FAKE_SKOPEO_ERROR, NBDKIT, run_nbdkit

NAME = "localhost/cdi-test/property:1"
KEYS = ("name", "layer", "pull", "tls-verify", "authfile", "cert-dir", "platform",
        "verify", "copy")
# podman's own words before "--", per command; everything else is ours.
COMMANDS = (("image", "exists"), ("image", "inspect"), ("pull", "--quiet"),
            ("save", "--quiet", "--format", "docker-archive"), ("artifact", "inspect"),
            ("artifact", "pull", "--quiet"))
# skopeo's: its global options (ours: --registries-conf, --override-*), then these.
SKOPEO_COMMANDS = (("inspect", "--raw"),
                   ("copy", "--quiet", "--dest-oci-accept-uncompressed-layers"))
PULL_OPTIONS = ("tls-verify", "authfile", "cert-dir", "platform")
EXAMPLES = settings(max_examples=25, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home(lab):
    """Hypothesis caches Unicode tables in its home, ./.hypothesis by
    default: keep them in the session's directory, not in the work tree."""
    saved = configuration.storage_directory()
    configuration.set_hypothesis_home_dir(os.path.join(lab.workdir, "hypothesis"))
    yield
    configuration.set_hypothesis_home_dir(saved)


class Outcome:
    def __init__(self, result, calls):
        self.status = result.returncode
        self.stderr = result.stderr.decode(errors="replace")
        self.calls = calls  # [{"argv": [bytes], "parent": str, "tmpdir": str}]


def run(fake_podman, tmpdir, *params):
    """nbdkit --run true with PARAMS (bytes or str) and the fake podman."""
    directory, record = fake_podman
    record.unlink(missing_ok=True)
    sockets = tempfile.mkdtemp(prefix="cdi-sock-")
    try:
        result = subprocess.run(
            [NBDKIT, "-U", os.path.join(sockets, "sock"), "python", CDI, *params,
             "--run", "true"],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False,
            env=dict(os.environ, PATH=f"{directory}:{os.environ['PATH']}"))
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
    calls = []
    if record.exists():
        for line in record.read_text().splitlines():
            call = json.loads(line)
            call["argv"] = [bytes.fromhex(word) for word in call["argv"]]
            calls.append(call)
    assert os.listdir(tmpdir) == [], "files left in TMPDIR"
    return Outcome(result, calls)


def argument(key, value):
    return key.encode() + b"=" + (value if isinstance(value, bytes) else value.encode())


def is_text(value):
    if isinstance(value, str):
        return True
    try:
        value.decode()
    except UnicodeDecodeError:
        return False
    return True


# ---------------------------------------------------------------- values

characters = st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")
text = st.text(characters, max_size=40)
HOSTILE = [
    "", " ", "\t", "\n", "\r\n", "-0", "-00", "+0", "0x1", "1e3", "1.0", "\u22121", "\u0663",
    "-", "--", "-x", "--foo", "--help", "--version", "--authfile=/etc/passwd", "-q",
    "..", "../../../../etc/passwd", "/../../..", "./-x", "a\nb", "true\n", " true",
    "TRUE", "${IFS}", "$(id)", "`id`", ";id", "|id", "&& id", "'", '"', "\\", "%s%n",
    "x" * 100_000, "/" * 5000, " " * 5000,
]
hostile = st.one_of(
    st.sampled_from(HOSTILE),
    text,
    text.map(lambda word: "-" + word),                      # option-like
    text.map(lambda word: "--" + word),
)
strange = st.one_of(
    st.lists(st.sampled_from(["..", ".", "", "etc", "passwd", "-x", "tmp"]),
             max_size=8).map("/".join),                     # path traversal
    st.integers().map(str),
    st.integers(1, 100_000).map(lambda count: "9" * count),  # huge numbers
    st.binary(max_size=40).filter(lambda data: b"\0" not in data),  # any bytes
)
# Values each key accepts, some of them odd, so that both outcomes are seen.
ACCEPTED = {
    "name": ["localhost/x", "docker://-x", "docker://--help", "containers-storage:-x",
             "oci-archive:/-x", "quay.io/a/b@sha256:" + "0" * 64, "x" * 10_000],
    "layer": ["0", "-1", "auto", "007", "99999"],
    "pull": ["missing", "always", "never"],
    "tls-verify": ["true", "FALSE", "On", "0", "yes"],
    "authfile": ["/etc/hostname", "../" * 40 + "etc/passwd", "/etc/../etc/passwd"],
    "cert-dir": ["/", "../" * 40, "/etc/./", "/tmp"],
    "platform": ["linux/amd64", "linux/arm64/v8", "freebsd/riscv64"],
    "verify": ["before", "true", "false", "NO"],
    "copy": ["true", "off", "1"],
}


def values(key):
    return st.one_of(st.sampled_from(ACCEPTED[key]), hostile, strange)


# --------------------------------------------------------------- checks


def expected_option(key, value):
    """The podman option VALUE of KEY must become, or None."""
    if key == "tls-verify":
        return f"--tls-verify={value.lower() in ('1', 'true', 'yes', 'on')}".lower()
    if key in ("authfile", "cert-dir"):
        return f"--{key}={os.path.abspath(value)}"
    if key == "platform":
        return f"--platform={value}"
    return None


def check_argv(argv, name, option):
    """ARGV (podman's, without argv[0]) has podman's own words, then
    OPTION if any, then "--" and one operand: the image."""
    words = [word.decode(errors="surrogateescape") for word in argv]
    assert "--" in words, words
    split = words.index("--")
    head, operands = words[:split], words[split + 1:]
    command = next((command for command in COMMANDS
                    if tuple(head[:len(command)]) == command), None)
    assert command is not None, f"unexpected podman command: {words}"
    pulls = command[0] == "pull" or command[:2] == ("artifact", "pull")
    assert head[len(command):] == ([option] if option and pulls else []), words
    assert len(operands) == 1, words
    if command[0] == "pull":
        assert operands == [name]
    elif command in (("image", "exists"), ("artifact", "inspect")):
        assert name.endswith(operands[0])


def check_skopeo_argv(argv, name, key, value):
    """ARGV (skopeo's, without argv[0]): global options of ours, skopeo's
    own words, the option VALUE of KEY becomes if any, then "--" and the
    operands: the image (and, for copy, the cache's layout)."""
    words = [word.decode(errors="surrogateescape") for word in argv]
    assert "--" in words, words
    split = words.index("--")
    head, operands = words[:split], words[split + 1:]
    globals_ = 0
    while globals_ < len(head) and head[globals_].startswith("--"):
        option = head[globals_].split("=", 1)[0]
        assert option in ("--tmpdir", "--registries-conf", "--override-os",
                          "--override-arch", "--override-variant"), words
        if option.startswith("--override-"):
            assert key == "platform" and head[globals_].split("=", 1)[1] in value, words
        globals_ += 1
    head = head[globals_:]
    command = next((command for command in SKOPEO_COMMANDS
                    if tuple(head[:len(command)]) == command), None)
    assert command is not None, f"unexpected skopeo command: {words}"
    prefix = "src-" if command[0] == "copy" else ""
    option = expected_option(key, value) if key != "platform" else None
    expected = [option.replace("--", f"--{prefix}", 1)] if option else []
    if command[0] == "copy" and not operands[0].startswith("docker://"):
        expected = []  # a file: no registry options
    assert head[len(command):] == expected, words
    source = operands[0]
    assert source == name or source == "docker://" + name.split("://", 1)[-1], words
    if command[0] == "copy":
        assert len(operands) == 2 and operands[1].startswith("oci:"), words
    else:
        assert len(operands) == 1, words


def check(outcome, key, value, name=NAME):
    """Rejected naming KEY, or accepted and passed to podman safely."""
    assert outcome.status != 0  # the fake podman makes every start fail
    first_line = outcome.stderr.splitlines()[0]
    if not is_text(value):
        # nbdkit's Python plugin decodes values as UTF-8 before the plugin
        # sees them: it rejects them with Python's words, not naming the key.
        assert first_line.startswith(f"nbdkit: error: {CDI}: config: error: "
                                     "'utf-8' codec can't decode byte"), outcome.stderr
        assert outcome.calls == []
        event("refused by nbdkit's UTF-8 decoding")
        return
    assert "Traceback" not in outcome.stderr, outcome.stderr
    for phase in ("config", "config_complete"):
        if first_line.startswith(f"nbdkit: error: {CDI}: {phase}: error: "):
            assert f"{key}=" in first_line or f"{key!r}" in first_line, first_line
            assert outcome.calls == [], "podman ran although the value was refused"
            event(f"refused in {phase}")
            return
    assert first_line.startswith(f"nbdkit: error: {CDI}: get_ready: error: "), outcome.stderr
    if not outcome.calls:
        # cdi.py asked the name's registry itself, and none answers.
        assert re.search(f"{re.escape(name)}: (not in the cache .*|pull=always), and its "
                         "registry .* is unreachable: ", first_line), outcome.stderr
        event("accepted, its registry read by cdi.py itself")
        return
    assert outcome.calls, "accepted, yet podman never ran"
    event("accepted")
    value = value if isinstance(value, str) else value.decode()
    option = expected_option(key, value)
    for call in outcome.calls:
        assert call["parent"] == "nbdkit", "podman was not started by nbdkit itself"
        assert call["tmpdir"].startswith(os.environ["TMPDIR"] + "/cdi-py-")
        if call["program"] == "skopeo":
            check_skopeo_argv(call["argv"], name, key, value)
        else:
            check_argv(call["argv"], name, option)
    # Or a name whose registry is not there, which cdi.py asks itself.
    # Or a name that is no reference, refused before any registry is asked.
    assert FAKE_ERROR in outcome.stderr or FAKE_SKOPEO_ERROR in outcome.stderr or \
        f"{name}: image not found in local storage" in outcome.stderr or \
        f"{name}: not in the cache " in outcome.stderr or \
        f"{name}: invalid reference format (" in outcome.stderr, outcome.stderr


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("key", KEYS)
@EXAMPLES
@given(data=st.data())
def test_hostile_value_is_refused_naming_its_key_or_passed_safely(
        fake_podman, plugin_tmpdir, key, data):
    value = data.draw(values(key), label="value")
    params = [argument(key, value)]
    if key != "name":
        params.insert(0, f"name={NAME}")
    outcome = run(fake_podman, plugin_tmpdir, *params)
    name = value if isinstance(value, str) else value.decode(errors="replace")
    check(outcome, key, value, name if key == "name" else NAME)


@EXAMPLES
@given(key=st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,30}", fullmatch=True)
       .filter(lambda key: key not in KEYS), value=st.one_of(hostile, strange))
def test_unknown_key_is_refused_naming_it(fake_podman, plugin_tmpdir, key, value):
    outcome = run(fake_podman, plugin_tmpdir, f"name={NAME}", argument(key, value))
    assert outcome.status == 1
    assert outcome.calls == []
    if is_text(value):
        assert outcome.stderr.startswith(
            f"nbdkit: error: {CDI}: config: error: unknown parameter {key!r}: "
            "this plugin takes name=, layer=, pull=, tls-verify="), outcome.stderr


@pytest.mark.parametrize("trick", ["$(touch${IFS}%s)", "`touch${IFS}%s`", ";touch${IFS}%s",
                                   "|touch${IFS}%s", "&&touch${IFS}%s"])
def test_shell_syntax_in_the_name_reaches_podman_verbatim(fake_podman, plugin_tmpdir, lab,
                                                          trick):
    marker = Path(lab.workdir) / f"shell-ran-{os.urandom(4).hex()}"
    name = "localhost/cdi-test/x" + trick % marker
    # pull-into=podman: cdi.py's own read of the registry (the default)
    # fails first at the closed port of localhost, before podman's pull.
    outcome = run(fake_podman, plugin_tmpdir, f"name={name}", "pull-into=podman")
    assert not marker.exists(), "a shell ran the name"
    # image exists, artifact inspect (in podman's artifact store?); then the
    # name, no reference, is refused before a registry is asked.
    assert [(call["program"], call["argv"][-1].decode()) for call in outcome.calls] == [
        ("podman", name), ("podman", name)]
    assert f"get_ready: error: {name}: invalid reference format (" in outcome.stderr
    assert {call["parent"] for call in outcome.calls} == {"nbdkit"}  # no shell between
    # The real podman too: the name is one argument it rejects.
    result = run_nbdkit(f"name={name}")
    assert result.returncode == 1
    assert not marker.exists(), "a shell ran the name"
    assert f"get_ready: error: {name}: " in result.stderr


@pytest.mark.parametrize("layer", ["9" * 4301, "-" + "0" * 4301],
                         ids=["4301-nines", "minus-4301-zeros"])
def test_layer_with_thousands_of_digits_is_one_line(fake_podman, plugin_tmpdir, layer):
    outcome = run(fake_podman, plugin_tmpdir, f"name={NAME}", f"layer={layer}")
    assert outcome.status == 1
    assert outcome.calls == []
    assert "Traceback" not in outcome.stderr
    assert outcome.stderr.startswith(f"nbdkit: error: {CDI}: config: error: layer=")


@pytest.mark.parametrize("name", ["oci-archive:/-x", "docker-archive:/tmp/--help"])
def test_a_name_skopeo_reads_reaches_it_verbatim(fake_podman, plugin_tmpdir, name):
    outcome = run(fake_podman, plugin_tmpdir, f"name={name}", "platform=linux/arm64",
                  "pull-into=podman")
    assert "skopeo" in [call["program"] for call in outcome.calls]
    for call in outcome.calls:
        assert call["parent"] == "nbdkit"
        if call["program"] == "skopeo":
            check_skopeo_argv(call["argv"], name, "platform", "linux/arm64")
        else:
            check_argv(call["argv"], name, "--platform=linux/arm64")
    assert FAKE_SKOPEO_ERROR in outcome.stderr or FAKE_ERROR in outcome.stderr, outcome.stderr
