"""The seccomp filter d-run hands to `bwrap --seccomp FD`, as a classic-BPF program.

It does two things, for the native and the compat (32-bit) system-call tables of the host:
- `ioctl(fd, TIOCSTI | TIOCLINUX, ...)` fails with EPERM, so a sandboxed program cannot push keystrokes
  into the user's terminal (CVE-2017-5226) even when d-run leaves it the terminal for job control;
- the chown family succeeds without doing anything: where bwrap maps a single user and group, any real
  change of owner would fail, and that failure is what stops dpkg and apt (debootwrap does the same); under
  a user's subordinate ids, a real one would leave files in DIR the user cannot remove;
- without a mapping of the image's ids (see userns), the setuid, setgid and setgroups families succeed
  without doing anything too, so that services and entrypoints that drop privileges run (as charliecloud).
"""

import errno
import sys
from collections import namedtuple

# Classic BPF opcodes (linux/bpf_common.h) and seccomp return values (linux/seccomp.h).
LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
RET_K = 0x06  # BPF_RET | BPF_K
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000  # low 16 bits: the errno; 0 makes the call return success without running it

# Offsets in struct seccomp_data: int nr; u32 arch; u64 ip; u64 args[6].
NR, ARCH, ARG1_LOW = 0, 4, 24  # ARG1_LOW: the low half of args[1] on little-endian machines

# The tty layer truncates the request to 32 bits, so comparing the low half catches every spelling.
TIOCSTI, TIOCLINUX = 0x5412, 0x541C


# One system-call table: its AUDIT_ARCH value, its ioctl, chown-family and set*id-family numbers, the mask applied
# to numbers first. (A namedtuple: importing typing for NamedTuple costs d-run ~2 ms of start-up.)
Table = namedtuple("Table", "arch ioctl chown ids nr_mask", defaults=(0xFFFFFFFF,))


X32_BIT = 0x40000000
# x86_64 also carries the x32 ABI (numbers with X32_BIT set): masking the bit folds it into the
# native table, where x32's own ioctl number, 514, is otherwise unused.
# The set*id calls: setuid, setgid, setre*, setgroups, setres*, setfs* (and their 32-bit-id forms on 32-bit tables).
IDS_32BIT = (23, 46, 70, 71, 81, 164, 170, 138, 139, 203, 204, 206, 208, 210, 213, 214, 215, 216)
X86_64_IDS = (105, 106, 113, 114, 116, 117, 119, 122, 123)
X86_64 = Table(0xC000003E, ioctl=(16, 514), chown=(92, 93, 94, 260), ids=X86_64_IDS, nr_mask=0xFFFFFFFF ^ X32_BIT)
I386 = Table(0x40000003, ioctl=(54,), chown=(16, 95, 182, 198, 207, 212, 298), ids=IDS_32BIT)
# only fchownat and fchown exist on aarch64
AARCH64 = Table(0xC00000B7, ioctl=(29,), chown=(54, 55), ids=(143, 144, 145, 146, 147, 149, 151, 152, 159))
ARM = Table(0x40000028, ioctl=(54,), chown=(16, 95, 182, 198, 207, 212, 325), ids=IDS_32BIT)

TABLES = {"x86_64": (X86_64, I386), "aarch64": (AARCH64, ARM)}


def insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    """One `struct sock_filter` in the kernel's (native) byte order (not by `struct`: 0.5 ms of d-run's start-up)."""
    return code.to_bytes(2, sys.byteorder) + bytes((jt, jf)) + k.to_bytes(4, sys.byteorder)


def table_section(table: Table, fake_chown: bool, fake_ids: bool) -> list[bytes]:
    """The rules for one table: entered with the arch checked, always ends in a return."""
    out = [insn(LD_W_ABS, NR)]
    if table.nr_mask != 0xFFFFFFFF:
        out.append(insn(AND_K, table.nr_mask))
    for number in (*(table.chown if fake_chown else ()), *(table.ids if fake_ids else ())):
        out += [insn(JEQ_K, number, jf=1), insn(RET_K, RET_ERRNO | 0)]
    for number in table.ioctl:
        out += [
            insn(JEQ_K, number, jf=5),  # not this ioctl number: skip the five below
            insn(LD_W_ABS, ARG1_LOW),
            insn(JEQ_K, TIOCSTI, jt=2),
            insn(JEQ_K, TIOCLINUX, jt=1),
            insn(RET_K, RET_ALLOW),
            insn(RET_K, RET_ERRNO | errno.EPERM),
        ]
    out.append(insn(RET_K, RET_ALLOW))
    return out


def filter_program(machine: str, fake_chown: bool = True, fake_ids: bool = False) -> bytes | None:
    """The packed filter for a host of `os.uname().machine`, or None where its tables are not known. A call
    made through a table the host has but this filter does not list fails with ENOSYS, never slips past.
    `fake_chown`, `fake_ids`: make the chown family, the set*id family succeed without effect."""
    tables = TABLES.get(machine)
    if tables is None:
        return None
    program = [insn(LD_W_ABS, ARCH)]
    for table in tables:
        section = table_section(table, fake_chown, fake_ids)
        program.append(insn(JEQ_K, table.arch, jf=len(section)))
        program += section
    program.append(insn(RET_K, RET_ERRNO | errno.ENOSYS))
    return b"".join(program)
