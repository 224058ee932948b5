#!/usr/bin/env python3
"""Writes the symbol ordering file for lld from what layout/pagetrack.c recorded.

usage: order.py BINARY ADDRS_DIR OUT

First the functions entered (an address recorded inside them), those entered by more
processes first, then by address; then the functions that share a page with a recorded
address without one of their own (a function entered while its page was unprotected is
missed by the tracker; it then still sits near the rest instead of anywhere in the binary).
"""

import bisect
import glob
import subprocess
import sys


def functions(binary):
    """(address, size, name) of every defined function, by address."""
    listing = subprocess.run(["nm", "-S", "-n", "--defined-only", binary], capture_output=True, text=True, check=True)
    found = []
    for line in listing.stdout.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[2] in "tTwW" and int(fields[1], 16) > 0:
            found.append((int(fields[0], 16), int(fields[1], 16), fields[3]))
    return found


def main(binary, addrs_dir, out):
    syms = functions(binary)
    starts = [address for address, _, _ in syms]

    def containing(at):
        i = bisect.bisect_right(starts, at) - 1
        return i if i >= 0 and at < syms[i][0] + syms[i][1] else None

    uses, pages = {}, set()
    for path in glob.glob(f"{addrs_dir}/*.addrs"):
        recorded = {int(line, 16) for line in open(path) if line.strip()}
        pages |= {at // 4096 for at in recorded}
        for i in {containing(at) for at in recorded} - {None}:
            uses[i] = uses.get(i, 0) + 1
    if not uses:
        sys.exit(f"order.py: no recorded address in {addrs_dir}/*.addrs falls in a function of {binary}")
    near = [
        i
        for i, (address, size, _) in enumerate(syms)
        if i not in uses and any(page in pages for page in range(address // 4096, (address + size - 1) // 4096 + 1))
    ]
    with open(out, "w") as f:
        for i in sorted(uses, key=lambda i: (-uses[i], i)):
            f.write(syms[i][2] + "\n")
        for i in near:
            f.write(syms[i][2] + "\n")
    kib = lambda group: sum(syms[i][1] for i in group) // 1024
    print(f"{len(uses)} functions entered ({kib(uses)} KiB), then {len(near)} sharing their pages ({kib(near)} KiB)")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
