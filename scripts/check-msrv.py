#!/usr/bin/env python3
"""Fails when a dependency in the lockfile needs a newer Rust than the package that uses it declares.

Only one toolchain is installed, so the MSRV cannot be checked by building with it. Instead, for
each workspace member, this reads the packages its build and tests actually use (`cargo tree`
with every feature, every target platform, normal, build and dev edges: cargo's real feature
resolution for that member alone) and compares each one's `rust-version` (from `cargo metadata`)
with the member's. Together the members cover every package of the lockfile that any build uses.

Clippy's `incompatible_msrv` lint checks the other half, our own code's use of the standard
library, against the same `rust-version`.

    python3 scripts/check-msrv.py
"""

import json
import re
import subprocess
import sys


def version_tuple(text):
    """'1.88' or '1.88.0' as a comparable tuple."""
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def cargo(*args):
    return subprocess.run(["cargo", *args], check=True, capture_output=True, text=True).stdout


def main():
    metadata = json.loads(cargo("metadata", "--format-version", "1", "--all-features"))
    rust_version = {(p["name"], p["version"]): p.get("rust_version") for p in metadata["packages"]}
    members = [p for p in metadata["packages"] if p["id"] in metadata["workspace_members"]]

    failures = []
    for member in members:
        declared = member.get("rust_version")
        if not declared:
            failures.append(f"{member['name']}: declares no rust-version")
            continue
        tree = cargo(
            "tree", "-p", member["name"], "--all-features", "--target", "all",
            "-e", "normal,build,dev", "--prefix", "none", "--format", "{p}",
        )
        used = set()
        for line in tree.splitlines():
            match = re.match(r"(\S+) v(\S+)", line)
            if match:
                used.add((match.group(1), match.group(2)))
        dependencies = used - {(m["name"], m["version"]) for m in members}
        newest = max(
            ((rust_version.get(p) or "0", p) for p in dependencies),
            key=lambda item: version_tuple(item[0]),
        )
        too_new = sorted(
            (p for p in dependencies
             if rust_version.get(p) and version_tuple(rust_version[p]) > version_tuple(declared)),
        )
        print(f"{member['name']}: rust-version {declared}, {len(used)} packages, "
              f"newest requirement {newest[0]} ({newest[1][0]} {newest[1][1]})")
        for name, version in too_new:
            failures.append(
                f"{member['name']} (rust-version {declared}) uses {name} {version}, "
                f"which needs Rust {rust_version[(name, version)]}"
            )

    for failure in failures:
        print(f"MSRV: {failure}", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
