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


ENTER = (
    "import os, sys; from dutils import userns; commands = userns.plan_mapping(False); print(commands is not None)\n"
    "userns.enter(commands); userns.become(33, 33, [33, 50]); print(os.getresuid(), os.getresgid(), os.getgroups())\n"
    "print(open('/proc/self/uid_map').read().split())"
)


@as_root
def test_root_maps_every_id_to_itself() -> None:
    done = subprocess.run([sys.executable, "-c", ENTER], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["True", "(33, 33, 33) (33, 33, 33) [33, 50]", "['0', '0', '4294967295']"]


@as_root
def test_a_user_with_a_range_maps_it_behind_their_own_ids(unprivileged) -> None:
    done = unprivileged.run([unprivileged.bin / "python", "-c", ENTER], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    own = subprocess.run(["id", "-u", "dutest"], capture_output=True, text=True, check=True).stdout.strip()
    assert lines[:2] == ["True", "(33, 33, 33) (33, 33, 33) [33, 50]"]
    assert lines[2] == str(["0", own, "1", "1", "100000", "65536"]).replace('"', "'"), lines


@as_root
def test_a_user_without_newuidmap_gets_no_mapping(unprivileged) -> None:
    code = "from dutils import userns; print(userns.plan_mapping(False), userns.plan_mapping(True))"
    env = {"PATH": str(unprivileged.bin)}
    done = unprivileged.run([unprivileged.bin / "python", "-c", code], capture_output=True, text=True, env=env)
    assert done.stdout == "None None\n", done.stderr


@as_root
def test_a_map_refused_by_newuidmap_is_an_error(unprivileged) -> None:
    code = (
        "from dutils import userns\n"
        "try: userns.enter([['/usr/bin/newuidmap', '0', '0', '1']])\n"
        "except OSError as err: print(err.strerror)"
    )
    done = unprivileged.run([unprivileged.bin / "python", "-c", code], capture_output=True, text=True, timeout=30)
    assert "newuidmap or newgidmap failed" in done.stdout, done
