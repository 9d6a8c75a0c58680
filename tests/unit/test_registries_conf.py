"""registries.conf read as containers/image reads it: which files, which
entry, which sources in which order, what is blocked.  Files in tmp_path;
no network."""

import pytest

from cdipy.errors import CdiError, NoSource
from cdipy.oci.registries_conf import Source, load, matching_prefix, pull_sources

DIGEST = "sha256:" + "a" * 64


@pytest.fixture
def world(tmp_path, monkeypatch):
    """(write, config): write(relative path, text) puts a file under
    tmp_path; config(CONTAINERS_REGISTRIES_CONF=...) loads what
    containers/image would, with tmp_path/etc for /etc/containers and
    tmp_path/home for ~."""
    def write(path, text):
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        return str(target)

    def config(CONTAINERS_REGISTRIES_CONF=None):  # noqa: N803 (the variable's name)
        if CONTAINERS_REGISTRIES_CONF:
            monkeypatch.setenv("CONTAINERS_REGISTRIES_CONF", CONTAINERS_REGISTRIES_CONF)
        else:
            monkeypatch.delenv("CONTAINERS_REGISTRIES_CONF", raising=False)
        return load(str(tmp_path / "home"), str(tmp_path / "etc/registries.conf"),
                    str(tmp_path / "etc/registries.conf.d"))
    return write, config


def names(sources):
    return [(source.name(), source.mirror) for source in sources]


MIRRORED = """
[[registry]]
prefix = "quay.io/org"
location = "quay.io/org"
[[registry.mirror]]
location = "mirror.example:5000/quay/org"
[[registry.mirror]]
location = "digests.example/org"
pull-from-mirror = "digest-only"
[[registry.mirror]]
location = "tags.example/org"
pull-from-mirror = "tag-only"
insecure = true
"""


def test_a_tag_is_tried_on_every_mirror_but_digest_only_then_the_primary(world):
    write, config = world
    write("etc/registries.conf", MIRRORED)
    sources = pull_sources(config(), "quay.io", "org/disk", "1")
    assert names(sources) == [("mirror.example:5000/quay/org/disk:1", True),
                              ("tags.example/org/disk:1", True), ("quay.io/org/disk:1", False)]
    assert [source.insecure for source in sources] == [False, True, False]


def test_a_digest_is_tried_on_every_mirror_but_tag_only(world):
    write, config = world
    write("etc/registries.conf", MIRRORED)
    assert names(pull_sources(config(), "quay.io", "org/disk", DIGEST)) == [
        (f"mirror.example:5000/quay/org/disk@{DIGEST}", True),
        (f"digests.example/org/disk@{DIGEST}", True), (f"quay.io/org/disk@{DIGEST}", False)]


def test_mirror_by_digest_only_leaves_a_tag_to_the_primary(world):
    write, config = world
    write("etc/registries.conf", '[[registry]]\nlocation = "quay.io"\n'
          "mirror-by-digest-only = true\n"
          '[[registry.mirror]]\nlocation = "cache.example"\n')
    assert names(pull_sources(config(), "quay.io", "a/b", "1")) == [("quay.io/a/b:1", False)]
    assert names(pull_sources(config(), "quay.io", "a/b", DIGEST)) == [
        (f"cache.example/a/b@{DIGEST}", True), (f"quay.io/a/b@{DIGEST}", False)]


def test_the_longest_prefix_wins_and_location_rewrites_what_it_matched(world):
    write, config = world
    write("etc/registries.conf", '[[registry]]\nprefix = "example.com"\n'
          'location = "other.example"\n'
          '[[registry]]\nprefix = "example.com/team"\nlocation = "internal:5000/mirror/team2"\n')
    assert names(pull_sources(config(), "example.com", "team/vm", "2")) == [
        ("internal:5000/mirror/team2/vm:2", False)]
    assert names(pull_sources(config(), "example.com", "teams/vm", "2")) == [
        ("other.example/teams/vm:2", False)]


def test_a_prefix_matches_whole_path_components_only(world):
    assert matching_prefix("example.com/team/vm", "example.com/team") == len("example.com/team")
    assert matching_prefix("example.com/teams/vm", "example.com/team") == -1
    assert matching_prefix("example.com:5000/vm", "example.com") == len("example.com")
    assert matching_prefix("example.comx/vm", "example.com") == -1
    write, config = world
    write("etc/registries.conf", "")
    assert names(pull_sources(config(), "h.example", "vm", "1")) == [("h.example/vm:1", False)]


def test_a_wildcard_matches_subdomains_and_its_mirrors_take_the_rest(world):
    write, config = world
    write("etc/registries.conf", '[[registry]]\nprefix = "*.example.com"\ninsecure = true\n'
          '[[registry.mirror]]\nlocation = "cache.local/ex"\n')
    assert names(pull_sources(config(), "a.b.example.com", "org/vm", "1")) == [
        ("cache.local/ex/org/vm:1", True), ("a.b.example.com/org/vm:1", False)]
    assert pull_sources(config(), "a.b.example.com", "org/vm", "1")[1].insecure
    assert names(pull_sources(config(), "example.com", "org/vm", "1")) == [
        ("example.com/org/vm:1", False)]
    assert matching_prefix("x.example.com/y/a.example.com", "*.example.com") == len(
        "x.example.com")
    assert matching_prefix("h/x.example.com", "*.example.com") == -1


def test_a_blocked_registry_says_so_in_containers_images_words(world):
    write, config = world
    path = write("etc/registries.conf", '[[registry]]\nlocation = "bad.example"\n'
                 "blocked = true\n")
    found = config()
    [source] = pull_sources(found, "bad.example", "x/y", "1")
    assert source.blocked == (f"registry bad.example is blocked in {path} or "
                              f"{found.description.split(' or ')[1]}")
    assert found.description.endswith("home/.config/containers/registries.conf.d")


def test_the_entry_is_found_for_the_name_as_containers_image_normalizes_it(world):
    write, config = world
    write("etc/registries.conf", '[[registry]]\nlocation = "docker.io/library/busybox"\n'
          "blocked = true\n")
    for host in ("docker.io", "index.docker.io"):
        [source] = pull_sources(config(), host, "busybox", "1")
        assert source.name() == "docker.io/library/busybox:1"
        assert source.blocked.startswith("registry docker.io/library/busybox is blocked in ")


@pytest.mark.parametrize("repository", ["open/../secret/vm", "open/./secret", "Secret/vm",
                                        "secret//vm"])
def test_a_name_that_is_no_reference_is_refused_in_one_line(world, repository):
    # Matched on the raw name, "example.com/open/../secret/vm" would miss
    # the blocked prefix, and a URL's ".." be resolved to the secret.
    write, config = world
    write("etc/registries.conf", '[[registry]]\nlocation = "example.com/secret"\n'
          "blocked = true\n")
    with pytest.raises(NoSource) as error:
        pull_sources(config(), "example.com", repository, "1")
    assert str(error.value) == ("invalid reference format (a registry, a repository of "
                                "lower-case names, and a tag or a digest)")


def test_a_blocked_mirror_is_blocked_and_the_primary_still_tried(world):
    write, config = world
    write("etc/registries.conf", '[[registry]]\nlocation = "quay.io"\n'
          '[[registry.mirror]]\nlocation = "bad.example/q"\n'
          '[[registry]]\nlocation = "bad.example"\nblocked = true\n')
    mirror, primary = pull_sources(config(), "quay.io", "a/b", "1")
    assert mirror.blocked.startswith("registry bad.example is blocked in ")
    assert primary.blocked is None


def test_the_environment_names_the_file_and_drop_ins_follow_in_name_order(world):
    write, config = world
    write("etc/registries.conf", '[[registry]]\nlocation = "ignored"\nblocked = true\n')
    chosen = write("chosen.conf", '[[registry]]\nlocation = "q.io"\ninsecure = true\n')
    write("etc/registries.conf.d/20-b.conf", '[[registry]]\nlocation = "q.io"\n'
          '[[registry.mirror]]\nlocation = "m2"\n')
    write("etc/registries.conf.d/10-a.conf", '[[registry]]\nlocation = "q.io"\n'
          '[[registry.mirror]]\nlocation = "m1"\n')
    write("etc/registries.conf.d/30-c.txt", '[[registry]]\nlocation = "q.io"\nblocked=true\n')
    found = config(CONTAINERS_REGISTRIES_CONF=chosen)
    assert names(pull_sources(found, "q.io", "x", "1")) == [("m2/x:1", True), ("q.io/x:1", False)]
    assert found.find("ignored/x") is None
    # The user's drop-ins come after the system's.
    write("home/.config/containers/registries.conf.d/00-z.conf",
          '[[registry]]\nlocation = "q.io"\n[[registry.mirror]]\nlocation = "m3"\n')
    assert names(pull_sources(config(CONTAINERS_REGISTRIES_CONF=chosen), "q.io", "x", "1"))[0] \
        == ("m3/x:1", True)


def test_a_users_registries_conf_replaces_the_systems_and_its_drop_ins(world):
    write, config = world
    write("etc/registries.conf", '[[registry]]\nlocation = "q.io"\nblocked = true\n')
    write("etc/registries.conf.d/a.conf", '[[registry]]\nlocation = "r.io"\nblocked = true\n')
    assert pull_sources(config(), "q.io", "x", "1")[0].blocked
    write("home/.config/containers/registries.conf", "unqualified-search-registries = []\n")
    assert pull_sources(config(), "q.io", "x", "1")[0].blocked is None
    assert pull_sources(config(), "r.io", "x", "1")[0].blocked is None


def test_the_first_of_two_entries_with_one_prefix_in_a_file_wins(world):
    write, config = world
    write("etc/registries.conf", '[[registry]]\nlocation = "q.io"\n'
          '[[registry.mirror]]\nlocation = "first"\n'
          '[[registry]]\nlocation = "q.io"\n[[registry.mirror]]\nlocation = "second"\n')
    assert names(pull_sources(config(), "q.io", "x", "1"))[0] == ("first/x:1", True)


def test_version_1_blocks_and_allows_insecure(world):
    write, config = world
    write("etc/registries.conf", "[registries.search]\nregistries = ['q.io']\n"
          "[registries.insecure]\nregistries = ['h:5000']\n"
          "[registries.block]\nregistries = ['bad.example']\n")
    assert pull_sources(config(), "h:5000", "x", "1") == [Source("h:5000", "x", "1", True)]
    assert pull_sources(config(), "bad.example", "x", "1")[0].blocked


@pytest.mark.parametrize("text, message", [
    ("[[registry]\n", "loading registries configuration"),
    ('[[registry]]\nprefix = "q.io"\n', "location is unset and prefix is not in the format"),
    ('[[registry]]\nlocation = "https://q.io"\n', "URI schemes are not supported"),
    ('[[registry]]\nlocation = "q.io"\nmirror-by-digest-only = true\n'
     '[[registry.mirror]]\nlocation = "m"\npull-from-mirror = "all"\n',
     "cannot set mirror usage mirror-by-digest-only"),
    ('[[registry]]\nlocation = "q.io"\n[[registry.mirror]]\nlocation = "m"\n'
     'pull-from-mirror = "sometimes"\n', "unsupported pull-from-mirror value 'sometimes'"),
    ('[[registry]]\nprefix = "*.q.io/x"\n', "Wildcarded prefix should be in the format"),
    ("[registries.search]\nregistries = ['q.io']\n[[registry]]\nlocation = 'q.io'\n",
     "mixing sysregistry v1/v2 is not supported"),
    ("credential-helpers = ['pass']\n[registries.block]\nregistries = ['q.io']\n",
     "mixing sysregistry v1/v2 is not supported"),
    ('credential-helpers = "pass"\n', "credential-helpers must be a list of strings"),
])
def test_what_containers_image_refuses_is_refused_naming_the_file(world, text, message):
    write, config = world
    path = write("etc/registries.conf", text)
    with pytest.raises(CdiError, match=message) as error:
        config()
    assert str(error.value).startswith(f"loading registries configuration '{path}': ")


def test_credential_helpers_are_the_last_files_that_sets_them_else_the_auth_files(world):
    write, config = world
    assert config().credential_helpers == ("containers-auth.json",)
    main = write("etc/registries.conf", 'credential-helpers = ["pass", "containers-auth.json"]\n')
    assert (config().credential_helpers, config().helpers_file) == (
        ("pass", "containers-auth.json"), main)
    write("etc/registries.conf.d/10-none.conf", "unqualified-search-registries = []\n")
    assert config().credential_helpers == ("pass", "containers-auth.json")
    drop_in = write("etc/registries.conf.d/20-ecr.conf", 'credential-helpers = ["ecr-login"]\n')
    assert (config().credential_helpers, config().helpers_file) == (("ecr-login",), drop_in)
    # Set to nothing, as containers/image takes it: the default again.
    write("etc/registries.conf.d/30-reset.conf", "credential-helpers = []\n")
    assert config().credential_helpers == ("containers-auth.json",)


def test_a_drop_in_in_version_1_is_refused(world):
    write, config = world
    write("etc/registries.conf.d/old.conf", "[registries.block]\nregistries = ['x']\n")
    with pytest.raises(CdiError, match="registry must be in v2 format but is in v1"):
        config()


def test_a_file_named_by_the_environment_must_exist(world, tmp_path):
    _, config = world
    with pytest.raises(CdiError, match="no such file"):
        config(CONTAINERS_REGISTRIES_CONF=str(tmp_path / "absent.conf"))
    assert config().entries == []  # the system's may be missing
