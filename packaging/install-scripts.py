#!/usr/bin/python3
"""Write mailshim's command wrappers (sendmail, mailq, newaliases, mailshim) into a package tree.

The entry points come from ``[project.scripts]`` in pyproject.toml; each wrapper is three
lines run by the system interpreter with ``-I`` (isolated: no PYTHON* variables, no user
site-packages, no script folder on sys.path), which matters for a command that root, cron and
sudo run. It also skips the ``re`` import of the generic console-script template, which is
on ``sendmail``'s start-up path. ``sendmail`` and ``newaliases`` go to /usr/sbin (Debian), or
every MTA name gets a suffix for RPM's ``alternatives``.

Trust: run at package build time, on the source tree, by the packager.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

MTA_NAMES = ("sendmail", "mailq", "newaliases")
TEMPLATE = """#!{python} -I
# mailshim: the `{name}` command ({target}); written by packaging/install-scripts.py
import sys
from {module} import {func}
sys.exit({func}())
"""


def entry_points(pyproject: str) -> dict[str, str]:
    """``[project.scripts]`` as {name: "module:function"}."""
    with open(pyproject, "rb") as fh:
        raw = fh.read()
    if sys.version_info >= (3, 11):
        import tomllib

        scripts = tomllib.loads(raw.decode("utf-8"))["project"]["scripts"]
        return {str(k): str(v) for k, v in scripts.items()}
    # No tomllib (Python 3.10, e.g. an RPM build root): the table is simple to read by hand.
    block = raw.decode("utf-8").split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^\s*"?([\w.-]+)"?\s*=\s*"([^"]+)"', block, re.M))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", required=True, help="package tree (DESTDIR)")
    parser.add_argument("--pyproject", default="pyproject.toml")
    parser.add_argument("--python", default="/usr/bin/python3", help="interpreter for #!")
    parser.add_argument("--sbin", default="/usr/sbin", help="folder for sendmail/newaliases")
    parser.add_argument("--bin", default="/usr/bin", help="folder for the other commands")
    parser.add_argument("--suffix", default="", help="added to MTA names (.mailshim for RPM)")
    parser.add_argument(
        "--newaliases-in-bin", action="store_true", help="newaliases in --bin (Fedora)"
    )
    args = parser.parse_args(argv)

    for name, target in sorted(entry_points(args.pyproject).items()):
        module, _, func = target.partition(":")
        if not module or not func.isidentifier():
            print(f"install-scripts: cannot use entry point {name} = {target!r}", file=sys.stderr)
            return 1
        sbin = name == "sendmail" or (name == "newaliases" and not args.newaliases_in_bin)
        folder = args.sbin if sbin else args.bin
        filename = name + (args.suffix if name in MTA_NAMES else "")
        # The build tool's own wrapper (usr/bin/<name>) is replaced by ours.
        for stale in {os.path.join(args.bin, name), os.path.join(args.sbin, name)}:
            path = os.path.join(args.root, stale.lstrip("/"))
            if os.path.lexists(path):
                os.unlink(path)
        path = os.path.join(args.root, folder.lstrip("/"), filename)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(
                TEMPLATE.format(
                    python=args.python, name=name, target=target, module=module, func=func
                )
            )
        os.chmod(path, 0o755)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
