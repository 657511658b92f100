"""The lock: exact versions of everything `make` installs, so no upstream release can change CI.

  python .ci/lock.py check LOCK   every distribution installed in this Python's environment (but
                                  vidkern itself) is pinned in LOCK (``name==version``) at exactly
                                  its installed version: an install from the lock pulled nothing
                                  unpinned. Exit 1 with each offender named.
  python .ci/lock.py write LOCK   rewrite LOCK's pins from this environment (its leading comment
                                  block is kept): `make lock` / `make lock-compat` run it in a
                                  fresh venv resolved from the unpinned requirements.

The package's own metadata keeps wide ranges (setup.py); the lock is for our machines only.
"""
import importlib.metadata
import re
import sys


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def installed():
    """{canonical name: version} of this environment, vidkern itself left out."""
    dists = {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    dists.pop("vidkern", None)
    return dists


def read(path):
    """(header comment lines, {canonical name: version}) of a lock file; a line that is not an exact
    pin (``==``) is an error, as a range would let a new release in."""
    header, pins = [], {}
    for number, line in enumerate(open(path), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            if not pins:
                header.append(line.rstrip("\n"))
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;=<>!~,]+)", text)
        if not match:
            sys.exit(f"{path}:{number}: {text!r} is not an exact pin (name==version)")
        pins[canonical(match[1])] = match[2]
    return header, pins


def problems(env, pins):
    out = [f"{name}=={version} is installed but not pinned" for name, version in sorted(env.items()) if name not in pins]
    out += [f"{name}=={version} is installed, the lock pins {pins[name]}" for name, version in sorted(env.items())
            if name in pins and pins[name] != version]
    return out


def main(argv):
    if len(argv) != 2 or argv[0] not in ("check", "write"):
        sys.exit(__doc__)
    command, path = argv
    if command == "check":
        _, pins = read(path)
        found = problems(installed(), pins)
        for p in found:
            print(f"lock {path}: {p}")
        print(f"lock {path}: {len(installed())} installed distributions, " + ("all pinned" if not found else f"{len(found)} problems"))
        return 1 if found else 0
    header, _ = read(path)
    with open(path, "w") as f:
        f.write("\n".join(header + [f"{n}=={v}" for n, v in sorted(installed().items())]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
