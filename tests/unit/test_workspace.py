"""The guardian's decisions: from what nbdkit wrote to it before the pipe
closed, whether to clean up, and which programs to stop first."""

from cdipy.workspace import orders


def test_done_means_nbdkit_cleaned_up_itself():
    assert orders(b"pid 10\npid 11\ndone\n") is None


def test_without_done_every_program_named_is_stopped():
    assert orders(b"pid 10\npid 11\n") == [10, 11]


def test_nothing_written_still_means_clean_up():
    # nbdkit killed before it started any program: the workspace goes.
    assert orders(b"") == []


def test_a_line_cut_short_by_the_kill_is_not_a_pid():
    assert orders(b"pid 10\npid 1") == [10, 1]
    assert orders(b"pid 10\npi") == [10]
    assert orders(b"pid 10\npid ") == [10]


def test_only_digits_name_a_process():
    assert orders(b"pid -1\npid 1x\npid 12\n") == [12]


def test_done_anywhere_counts_but_not_inside_another_line():
    assert orders(b"done\npid 3\n") is None
    assert orders(b"pid 3 done\n") == []
