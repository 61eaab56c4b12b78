"""Checks that shared libraries are aligned for 16 KB memory pages.

Usage: python3 elf_align.py [--min BYTES] LIB.so...   (default --min 16384)
       python3 elf_align.py --self-test
Every PT_LOAD segment's p_align must be at least --min (what Android's
check_elf_alignment.sh and `readelf -lW` look at). Exit 1 naming each library that is
not. Plain Python, no readelf: it also runs on macOS. Used by bindings/build-android.sh
(the .so files of the AAR) and, as a self-test, by scripts/test.d/packaging.sh.
"""
import struct
import sys
import tempfile

PT_LOAD = 1


def load_aligns(data):
    if data[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    bits = {1: 32, 2: 64}[data[4]]
    end = {1: "<", 2: ">"}[data[5]]
    if bits == 64:
        phoff, = struct.unpack_from(end + "Q", data, 0x20)
        phentsize, phnum = struct.unpack_from(end + "HH", data, 0x36)
    else:
        phoff, = struct.unpack_from(end + "I", data, 0x1C)
        phentsize, phnum = struct.unpack_from(end + "HH", data, 0x2A)
    aligns = []
    for i in range(phnum):
        off = phoff + i * phentsize
        p_type, = struct.unpack_from(end + "I", data, off)
        if p_type != PT_LOAD:
            continue
        if bits == 64:
            p_align, = struct.unpack_from(end + "Q", data, off + 0x30)
        else:
            p_align, = struct.unpack_from(end + "I", data, off + 0x1C)
        aligns.append(p_align)
    if not aligns:
        raise ValueError("no LOAD segment")
    return aligns


def check(paths, minimum):
    bad = 0
    for path in paths:
        try:
            aligns = load_aligns(open(path, "rb").read())
        except (ValueError, KeyError, struct.error) as e:
            print(f"{path}: cannot read ELF program headers: {e}")
            bad += 1
            continue
        low = min(aligns)
        verdict = "ok" if low >= minimum else f"NOT aligned to {minimum}"
        print(f"{path}: LOAD alignment {', '.join(hex(a) for a in aligns)}: {verdict}")
        bad += low < minimum
    return bad


def fake_elf(bits, align):
    """A minimal little-endian ELF with one PT_LOAD program header."""
    if bits == 64:
        header = bytearray(64)
        header[:6] = b"\x7fELF\x02\x01"
        struct.pack_into("<QHH", header, 0x20, 64, 0, 0)
        struct.pack_into("<HH", header, 0x36, 56, 1)
        ph = struct.pack("<IIQQQQQQ", PT_LOAD, 5, 0, 0, 0, 0, 0, align)
    else:
        header = bytearray(52)
        header[:6] = b"\x7fELF\x01\x01"
        struct.pack_into("<I", header, 0x1C, 52)
        struct.pack_into("<HH", header, 0x2A, 32, 1)
        ph = struct.pack("<IIIIIIII", PT_LOAD, 0, 0, 0, 0, 0, 5, align)
    return bytes(header) + ph


def self_test():
    cases = [(64, 0x4000, 0), (64, 0x1000, 1), (32, 0x4000, 0), (32, 0x2000, 1)]
    with tempfile.TemporaryDirectory() as tmp:
        for bits, align, expect in cases:
            path = f"{tmp}/lib{bits}-{align:x}.so"
            open(path, "wb").write(fake_elf(bits, align))
            got = check([path], 16384)
            if got != expect:
                sys.exit(f"elf_align self-test: {bits}-bit, p_align {align:#x}: expected {expect} failure(s), got {got}")
    print("elf_align self-test ok (32/64-bit, 4/8/16 KB)")


def main(argv):
    if argv == ["--self-test"]:
        self_test()
        return
    minimum = 16384
    if argv[:1] == ["--min"]:
        minimum, argv = int(argv[1]), argv[2:]
    if not argv:
        sys.exit(__doc__)
    bad = check(argv, minimum)
    if bad:
        sys.exit(f"FAILED: {bad} of {len(argv)} librar{'y' if len(argv) == 1 else 'ies'} not aligned to {minimum} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
