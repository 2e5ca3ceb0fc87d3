"""The lock files `make run`, `make test` and CI install from, so the versions tested are the
versions installed.

    python requirements/lock.py compile [--upgrade]   # `make lock` / `make upgrade`
    python requirements/lock.py check LOCK            # before each install from LOCK

``compile`` runs pip-compile (pip-tools) on pyproject.toml: ``dev.lock`` with every extra
(dev, delta, iceberg...), then ``run.lock`` (lakesync's own dependencies) constrained by
``dev.lock``, so both pin a package to the same version. Without ``--upgrade`` the pins
already in dev.lock are kept and only what pyproject.toml adds or changes is resolved; with
it, everything moves to the newest versions pyproject.toml allows.

Each lock records a digest of pyproject.toml's dependency lists; ``check`` refuses to
install from a lock compiled from other lists (a dependency added without `make lock`)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
DEV, RUN = ROOT / "requirements" / "dev.lock", ROOT / "requirements" / "run.lock"
MARK = "# pyproject.toml dependencies sha256: "
PIP_COMPILE = [
    sys.executable, "-m", "piptools", "compile", "--quiet", "--strip-extras", "--allow-unsafe",
    "--no-emit-index-url", "--no-emit-find-links", "--no-emit-trusted-host",
]  # fmt: skip


def digest() -> str:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    lists = {
        "requires-python": project.get("requires-python"),
        "dependencies": sorted(project.get("dependencies", [])),
        "optional-dependencies": {
            k: sorted(v) for k, v in project.get("optional-dependencies", {}).items()
        },
    }
    return hashlib.sha256(json.dumps(lists, sort_keys=True).encode()).hexdigest()


def stamp(lock: Path) -> None:
    lines = [x for x in lock.read_text().splitlines() if not x.startswith(MARK)]
    at = next((i for i, x in enumerate(lines) if not x.startswith("#")), len(lines))
    lines.insert(at, MARK + digest())
    lock.write_text("\n".join(lines) + "\n")


def compile_locks(upgrade: bool) -> None:
    try:
        import piptools  # noqa: F401
    except ImportError:  # a fresh venv: pip-tools as pinned in dev.lock, if it is there
        old = DEV.read_text().splitlines() if DEV.exists() else []
        pinned = [x for x in old if x.startswith("pip-tools==")]
        install = [sys.executable, "-m", "pip", "install", "--quiet"]
        subprocess.run([*install, *(pinned or ["pip-tools>=7.4,<8"])], check=True)
    rel = [str(p.relative_to(ROOT)) for p in (PYPROJECT, DEV, RUN)]
    more = ["--upgrade"] if upgrade else []
    env = os.environ | {"CUSTOM_COMPILE_COMMAND": "make lock"}  # the header's "made by"

    def run(*args: str) -> None:
        subprocess.run([*PIP_COMPILE, *args], check=True, cwd=ROOT, env=env)

    run(*more, "--all-extras", "-o", rel[1], rel[0])
    # run.lock is fully decided by dev.lock: re-resolved each time, never left behind
    run("--upgrade", "-c", rel[1], "-o", rel[2], rel[0])
    for lock in (DEV, RUN):
        stamp(lock)


def check(lock: Path) -> int:
    if not lock.exists():
        print(f"{lock} is missing: run `make lock` to create it.", file=sys.stderr)
        return 1
    marks = [x for x in lock.read_text().splitlines() if x.startswith(MARK)]
    if marks != [MARK + digest()]:
        print(
            f"{lock.relative_to(ROOT)} was compiled from other dependencies than pyproject.toml "
            "now declares. Run `make lock` (it keeps the pins already there and resolves only "
            "what changed), run `make test`, and commit requirements/*.lock.",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["compile"] and set(argv[1:]) <= {"--upgrade"}:
        compile_locks(upgrade="--upgrade" in argv)
        return 0
    if argv[:1] == ["check"] and len(argv) == 2:
        return check(Path(argv[1]).resolve())
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
