"""Guix's QEMU platform table, transcribed independently for the qemu-binfmt tests.

Copied row by row from ``/work/shared/spec/guix-reference.md`` §3.3 (which
quotes Guix's ``gnu/services/virtualization.scm``, itself from QEMU's
``scripts/qemu-binfmt-conf.sh``), without looking at ``services/qemu_binfmt.py``:
the tests compare the module's registration strings with the ones built here.
"""

from __future__ import annotations

#: §3.3, verbatim: | name | family | in %qemu-platforms | magic (hex) | mask (hex) |
GUIX_TABLE_MARKDOWN = """
| `i386` | `i386` | yes | `7f 45 4c 46 01 01 01 00 00 00 00 00 00 00 00 00 02 00 03 00` | `ff ff ff ff ff fe fe ff ff ff ff ff ff ff ff ff fe ff ff ff` |
| `i486` | `i386` | **no** | `7f 45 4c 46 01 01 01 00 00 00 00 00 00 00 00 00 02 00 06 00` | `ff ff ff ff ff fe fe 00 ff ff ff ff ff ff ff ff fe ff ff ff` |
| `x86_64` | `i386` | yes | `7f 45 4c 46 02 01 01 00 00 00 00 00 00 00 00 00 02 00 3e 00` | `ff ff ff ff ff fe fe 00 ff ff ff ff ff ff ff ff fe ff ff ff` |
| `alpha` | `alpha` | yes | `7f 45 4c 46 02 01 01 00 00 00 00 00 00 00 00 00 02 00 26 90` | `ff ff ff ff ff fe fe ff ff ff ff ff ff ff ff ff fe ff ff ff` |
| `arm` | `arm` | yes | `7f 45 4c 46 01 01 01 00 00 00 00 00 00 00 00 00 02 00 28 00` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff fe ff ff ff` |
| `armeb` | `armeb` | **no** | `7f 45 4c 46 01 02 01 00 00 00 00 00 00 00 00 00 00 02 00 28` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff ff fe ff ff` |
| `sparc` | `sparc` | **no** | `7f 45 4c 46 01 02 01 00 00 00 00 00 00 00 00 00 00 02 00 02` | `ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff fe ff ff` |
| `sparc32plus` | `sparc` | yes | `7f 45 4c 46 01 02 01 00 00 00 00 00 00 00 00 00 00 02 00 12` | `ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff fe ff ff` |
| `sparc64` | `sparc` | yes | `7f 45 4c 46 02 02 01 00 00 00 00 00 00 00 00 00 00 02 00 2b` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff ff fe ff ff` |
| `ppc` | `ppc` | yes | `7f 45 4c 46 01 02 01 00 00 00 00 00 00 00 00 00 00 02 00 14` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff ff fe ff ff` |
| `ppc64` | `ppc` | yes | `7f 45 4c 46 02 02 01 00 00 00 00 00 00 00 00 00 00 02 00 15` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff ff fe ff ff` |
| `ppc64le` | `ppcle` | yes | `7f 45 4c 46 02 01 01 00 00 00 00 00 00 00 00 00 02 00 15 00` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff fe ff ff 00` |
| `m68k` | `m68k` | yes | `7f 45 4c 46 01 02 01 00 00 00 00 00 00 00 00 00 00 02 00 04` | `ff ff ff ff ff ff fe fe ff ff ff ff ff ff ff ff ff fe ff ff` |
| `mips` | `mips` | yes | `7f 45 4c 46 01 02 01 00 00 00 00 00 00 00 00 00 00 02 00 08` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff ff fe ff ff` |
| `mipsel` | `mips` | yes | `7f 45 4c 46 01 01 01 00 00 00 00 00 00 00 00 00 02 00 08 00` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff fe ff ff ff` |
| `mipsn32` | `mips` | yes | `7f 45 4c 46 01 02 01 00 00 00 00 00 00 00 00 00 00 02 00 08` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff ff fe ff ff` |
| `mipsn32el` | `mips` | yes | `7f 45 4c 46 01 01 01 00 00 00 00 00 00 00 00 00 02 00 08 00` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff fe ff ff ff` |
| `mips64` | `mips` | yes | `7f 45 4c 46 02 02 01 00 00 00 00 00 00 00 00 00 00 02 00 08` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff ff fe ff ff` |
| `mips64el` | `mips` | yes | `7f 45 4c 46 02 01 01 00 00 00 00 00 00 00 00 00 02 00 08 00` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff fe ff ff ff` |
| `sh4` | `sh4` | yes | `7f 45 4c 46 01 01 01 00 00 00 00 00 00 00 00 00 02 00 2a 00` | `ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff fe ff ff ff` |
| `sh4eb` | `sh4` | yes | `7f 45 4c 46 01 02 01 00 00 00 00 00 00 00 00 00 00 02 00 2a` | `ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff fe ff ff` |
| `s390x` | `s390x` | yes | `7f 45 4c 46 02 02 01 00 00 00 00 00 00 00 00 00 00 02 00 16` | `ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff ff fe ff ff` |
| `aarch64` | `arm` | yes | `7f 45 4c 46 02 01 01 00 00 00 00 00 00 00 00 00 02 00 b7 00` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff fe ff ff ff` |
| `aarch64be` | `armeb` | **no** | `7f 45 4c 46 02 02 01 00 00 00 00 00 00 00 00 00 00 02 00 b7` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff ff fe ff ff` |
| `hppa` | `hppa` | yes | `7f 45 4c 46 01 02 01 00 00 00 00 00 00 00 00 00 00 02 00 0f` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff ff fe ff ff` |
| `riscv32` | `riscv` | yes | `7f 45 4c 46 01 01 01 00 00 00 00 00 00 00 00 00 02 00 f3 00` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff fe ff ff ff` |
| `riscv64` | `riscv` | yes | `7f 45 4c 46 02 01 01 00 00 00 00 00 00 00 00 00 02 00 f3 00` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff fe ff ff ff` |
| `xtensa` | `xtensa` | yes | `7f 45 4c 46 01 01 01 00 00 00 00 00 00 00 00 00 02 00 5e 00` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff fe ff ff ff` |
| `xtensaeb` | `xtensaeb` | yes | `7f 45 4c 46 01 02 01 00 00 00 00 00 00 00 00 00 00 02 00 5e` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff ff fe ff ff` |
| `microblaze` | `microblaze` | yes | `7f 45 4c 46 01 02 01 00 00 00 00 00 00 00 00 00 02 00 ba ab` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff fe ff ff ff` |
| `microblazeel` | `microblazeel` | yes | `7f 45 4c 46 01 01 01 00 00 00 00 00 00 00 00 00 02 00 ab ba` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff fe ff ff ff` |
| `or1k` | `or1k` | yes | `7f 45 4c 46 01 02 01 00 00 00 00 00 00 00 00 00 00 02 00 5c` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff ff fe ff ff` |
| `hexagon` | `hexagon` | yes | `7f 45 4c 46 01 01 01 00 00 00 00 00 00 00 00 00 02 00 a4 00` | `ff ff ff ff ff ff ff 00 ff ff ff ff ff ff ff ff fe ff ff ff` |
| `loongarch64` | `loongarch` | yes | `7f 45 4c 46 02 01 01 00 00 00 00 00 00 00 00 00 02 00 02 01` | `ff ff ff ff ff ff ff fc 00 ff ff ff ff ff ff ff fe ff ff ff` |
"""

#: §3.2, verbatim: the names in ``%qemu-platforms``, in order.
QEMU_PLATFORMS = (
    "i386 x86_64 alpha arm sparc32plus sparc64 ppc ppc64 ppc64le m68k mips mipsel mipsn32 mipsn32el "
    "mips64 mips64el sh4 sh4eb s390x aarch64 hppa riscv32 riscv64 xtensa xtensaeb microblaze microblazeel "
    "or1k hexagon loongarch64"
).split()

#: §3.2: defined in Guix but not in ``%qemu-platforms``.
NOT_LISTED = ("i486", "armeb", "sparc", "aarch64be")

#: §3.4, verbatim: Guix's example registration for ``arm`` (store path elided as written).
GUIX_ARM_EXAMPLE = (
    r":qemu-arm:M::\x7f\x45\x4c\x46\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x28\x00"
    r":\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
    r":/gnu/store/<hash>-qemu-<ver>-static/bin/qemu-arm:FP"
)

#: real-daemons-here.md §4, verbatim: Debian's qemu-user-static ``/usr/lib/binfmt.d/qemu-aarch64.conf``.
DEBIAN_AARCH64_CONF = (
    r":qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
    r":\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
    r":/usr/libexec/qemu-binfmt/aarch64-binfmt-P:OPF"
)


def _rows() -> dict[str, tuple[str, bool, str, str]]:
    rows: dict[str, tuple[str, bool, str, str]] = {}
    for line in GUIX_TABLE_MARKDOWN.strip().splitlines():
        cells = [cell.strip().strip("`").strip("*") for cell in line.strip().strip("|").split("|")]
        name, family, listed, magic, mask = cells
        rows[name] = (family, listed == "yes", magic, mask)
    return rows


#: name -> (family, in %qemu-platforms, magic as "7f 45 ...", mask as "ff ff ...").
GUIX_TABLE = _rows()


def escaped(spaced_hex: str) -> str:
    r"""``"7f 45"`` → ``\x7f\x45`` (every byte, lowercase, as Guix writes them)."""
    return "".join("\\x" + byte.lower() for byte in spaced_hex.split())


def guix_registration(name: str, interpreter: str, flags: str = "FP") -> str:
    """Guix's registration string for platform `name` (§3.4)."""
    _family, _listed, magic, mask = GUIX_TABLE[name]
    return ":".join(["", f"qemu-{name}", "M", "", escaped(magic), escaped(mask), interpreter, flags])
