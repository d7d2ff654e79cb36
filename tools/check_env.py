"""Print the installed versions of the packages a constraints file pins, and fail on a mismatch.

    python tools/check_env.py constraints.txt

CI runs it after installing, so a run always says what it tested (a local build suffix such as
torch's ``+cpu`` is allowed).
"""
from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version


def pins(path: str) -> dict[str, str]:
    out = {}
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, want = line.partition("==")
            out[name.strip()] = want.strip()
    return out


def main(path: str) -> int:
    bad = []
    for name, want in pins(path).items():
        try:
            got = version(name)
        except PackageNotFoundError:
            got = "not installed"
        ok = got.split("+", 1)[0] == want
        print(f"{name:14s} {got:20s} {'ok' if ok else 'WANTED ' + want}")
        if not ok:
            bad.append(name)
    if bad:
        print(f"check_env: {', '.join(bad)} not as pinned in {path}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "constraints.txt"))
