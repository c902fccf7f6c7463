"""The seccomp filter's choices: chown faked unless root maps every id, set*id faked only without a mapping."""

import pytest
from test_run import AARCH64, ALLOW, ARM, EPERM, I386, SUCCEED, X86_64, run_filter

from dutils import seccomp

SETUID = {"x86_64": (105, X86_64), "i386": (213, I386), "aarch64": (146, AARCH64), "arm": (213, ARM)}
SETGROUPS = {"x86_64": (116, X86_64), "i386": (81, I386), "aarch64": (159, AARCH64), "arm": (206, ARM)}
HOST = {"x86_64": "x86_64", "i386": "x86_64", "aarch64": "aarch64", "arm": "aarch64"}


@pytest.mark.parametrize("table", SETUID)
@pytest.mark.parametrize("fake_ids", [True, False])
def test_the_id_calls_succeed_without_effect_only_when_asked(table: str, fake_ids: bool) -> None:
    program = seccomp.filter_program(HOST[table], fake_ids=fake_ids)
    for nr, arch in (SETUID[table], SETGROUPS[table]):
        assert run_filter(program, nr, arch, 0) == (SUCCEED if fake_ids else ALLOW)


@pytest.mark.parametrize("machine, nr, arch", [("x86_64", 92, X86_64), ("x86_64", 212, I386), ("aarch64", 54, AARCH64)])
def test_chown_is_real_when_not_faked_and_the_terminal_stays_guarded(machine: str, nr: int, arch: int) -> None:
    assert run_filter(seccomp.filter_program(machine, fake_chown=True), nr, arch, 0) == SUCCEED
    program = seccomp.filter_program(machine, fake_chown=False)
    assert run_filter(program, nr, arch, 0) == ALLOW
    ioctl = 16 if arch == X86_64 else 54 if arch == I386 else 29
    assert run_filter(program, ioctl, arch, seccomp.TIOCSTI) == EPERM


def test_the_tables_list_each_call_once() -> None:
    for table in (seccomp.X86_64, seccomp.I386, seccomp.AARCH64, seccomp.ARM):
        numbers = [*table.ioctl, *table.chown, *table.ids]
        assert len(numbers) == len(set(numbers)), table
