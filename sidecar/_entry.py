"""The `work-sidecar` console script: the CLI, or one line saying how to install it.

`pip install work-sidecar` installs the client only (`sidecar.client`: grpcio and protobuf); every command of the
script needs the `server` extra. Without it the script prints what to install, in one line, and exits 2. Nothing
is checked on the way in: only a missing module makes the script look at what is installed.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

DISTRIBUTION = "work-sidecar"
INSTALL_HINT = "pip install 'work-sidecar[server]'"
USAGE_EXIT = 2


def missing_server_requirements() -> list[str]:
    """The `server` extra's requirements that are not installed (none when this is not an installed
    distribution, e.g. a source checkout on sys.path). Read from the installed metadata (`Requires-Dist`)."""
    from importlib import metadata

    try:
        requirements = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return []
    missing = []
    for text in requirements:
        spec, _, marker = text.partition(";")
        if not re.search(r"""extra\s*==\s*["']server["']""", marker):
            continue  # a base requirement, or another extra's
        if "sys_platform" in marker and sys.platform == "win32":
            continue  # the one platform-bound requirement (uvloop) is not for Windows
        name = re.split(r"[\s<>=!~\[(;]", spec.strip(), maxsplit=1)[0]
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from .cli import main as cli_main

        return cli_main(argv)
    except ModuleNotFoundError as exc:
        missing = missing_server_requirements()
        if not missing:
            raise
        named = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        print(
            f"work-sidecar: only the client is installed (sidecar.client); the sidecar needs {named} "
            f"(no module {exc.name!r}): {INSTALL_HINT}",
            file=sys.stderr,
        )
        return USAGE_EXIT
