"""The user namespace d-run makes: the subordinate ranges it reads, the groups it takes, the maps it gets."""

import subprocess
import sys

import pytest
from malicious import as_root

from dutils import userns

SUBUID = "# comment\nbad line\nother:5000:10\nalice:100000:0\nalice:200000:65536\n1001:300000:10\n"


@pytest.mark.parametrize(
    "name, own, expected",
    [("alice", 1000, (200000, 65536)), ("bob", 1001, (300000, 10)), ("carol", 1002, None), ("other", 7, (5000, 10))],
)
def test_subordinate_range_by_name_or_number_skipping_empty_ranges(name: str, own: int, expected) -> None:
    assert userns.subordinate_range(SUBUID, name, own) == expected


def test_subordinate_range_refuses_what_is_not_a_number() -> None:
    assert userns.subordinate_range("alice:²:10\nalice:-5:10\nalice:1:x\n", "alice", 1000) is None


PASSWD = "root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
GROUP = "root:x:0:\nwww-data:x:33:app\napp:x:1000:\nstaff:x:50:root,app\nbroken:x:zz:app\n"


@pytest.mark.parametrize(
    "uid, gid, expected", [(1000, 1000, [1000, 33, 50]), (0, 0, [0, 50]), (1000, 33, [33, 50]), (4321, 77, [77])]
)
def test_image_groups_follow_etc_group(uid: int, gid: int, expected: list[int]) -> None:
    assert userns.image_groups(uid, gid, PASSWD, GROUP) == expected


def test_start_up_loads_neither_ctypes_nor_pwd() -> None:
    code = "import sys, dutils.run; print(sorted({'ctypes', 'pwd'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert done.stdout == "[]\n"


@pytest.mark.parametrize(
    "inside, expected",
    [
        (0, [0, 1001, 1, 1, 100000, 65536]),
        (33, [33, 1001, 1, 0, 100000, 33, 34, 100033, 65503]),
        (65536, [65536, 1001, 1, 0, 100000, 65536]),
        (70000, [70000, 1001, 1, 0, 100000, 65536]),
    ],
)
def test_keep_id_puts_the_users_own_id_at_the_images(inside: int, expected: list[int]) -> None:
    assert userns.keep_id(inside, 1001, 100000, 65536) == expected


def namespace_maps(python: str, run=subprocess.run, ids: str = "33, 33", table="uid_map") -> str:
    """A map of the namespace userns.make gives for the image ids `ids`, read from a process that joined it."""
    code = (
        f"import os, subprocess, sys; from dutils import run, userns; maps = userns.plan_maps({ids}, run.read_setting)\n"
        "fd = userns.make(maps)[0]\n"
        "done = subprocess.run(['nsenter', f'--user=/proc/self/fd/{fd}', '--preserve-credentials', 'cat',"
        f" '/proc/self/{table}'], pass_fds=[fd], capture_output=True, text=True)\n"
        "print(done.stdout.split() or done.stderr)"
    )
    done = run([python, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


@as_root
@pytest.mark.integration
@pytest.mark.parametrize("ids", ["0, 0", "1000, 1000"])
def test_root_maps_every_id_to_itself_for_every_image_user(ids: str) -> None:
    assert namespace_maps(sys.executable, ids=ids) == "['0', '0', '4294967295']\n"


@as_root
def test_a_user_with_a_range_gets_it_around_their_own_id(unprivileged) -> None:
    own = subprocess.run(["id", "-u", "dutest"], capture_output=True, text=True, check=True).stdout.strip()
    maps = namespace_maps(unprivileged.bin / "python", unprivileged.run, ids="33, 33")
    assert maps == str(["33", own, "1", "0", "100000", "33", "34", "100033", "65503"]) + "\n"


@as_root
def test_a_user_without_newuidmap_gets_no_mapping(unprivileged) -> None:
    code = "from dutils import run, userns; print(userns.plan_maps(0, 0, run.read_setting))"
    env = {"PATH": str(unprivileged.bin)}
    done = unprivileged.run([unprivileged.bin / "python", "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout == "None\n", done.stderr


@as_root
def test_a_map_refused_by_newuidmap_is_an_error(unprivileged) -> None:
    code = (
        "import os; from dutils import userns\n"
        "try: userns.make((['/usr/bin/newuidmap', '/usr/bin/newgidmap'], [0, 0, 1], [0, 0, 1]))\n"
        "except Exception as err: print(err)"
    )
    done = unprivileged.run([unprivileged.bin / "python", "-c", code], capture_output=True, text=True, timeout=30)
    assert "newuidmap or newgidmap failed" in done.stdout, done
