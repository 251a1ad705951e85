#!/usr/bin/python3
"""Write mailshim's command wrappers (sendmail, mailq, newaliases, mailshim) into a package tree.

The entry points come from ``[project.scripts]`` in pyproject.toml, and for the MTA commands
(plain scripts for pip, listed in ``[tool.setuptools] script-files``) from the
``from module import function`` line of each script. Each wrapper is run by the system
interpreter with ``-IS`` (one word: the kernel passes the rest of a ``#!`` line as a single
argument). ``-I``, isolated (no PYTHON* variables, no user site-packages, no script folder
on sys.path), matters for a command that root, cron and sudo run; ``-S``: no
``site`` module, whose ``.pth`` processing is about a fifth of ``sendmail``'s start-up (issue
14); the wrapper appends the folder(s) the package and its dependencies are installed in
(``--sitelib``: Debian's dist-packages by default) to ``sys.path`` itself. It also skips the
``re`` import of the generic console-script template. ``sendmail`` and ``newaliases`` go to
/usr/sbin (Debian), or every MTA name gets a suffix for RPM's ``alternatives``.

Trust: run at package build time, on the source tree, by the packager.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

MTA_NAMES = ("sendmail", "mailq", "newaliases")
TEMPLATE = """#!{python} -IS
# mailshim: the `{name}` command ({target}); written by packaging/install-scripts.py
import sys
sys.path.extend({sitelib!r})
from {module} import {func}
sys.exit({func}())
"""


def entry_points(pyproject: str) -> dict[str, str]:
    """``[project.scripts]`` and the ``script-files`` as {name: "module:function"}."""
    with open(pyproject, "rb") as fh:
        raw = fh.read()
    if sys.version_info >= (3, 11):
        import tomllib

        project = tomllib.loads(raw.decode("utf-8"))
        found = {str(k): str(v) for k, v in project["project"]["scripts"].items()}
        files = [
            str(f) for f in project.get("tool", {}).get("setuptools", {}).get("script-files", [])
        ]
    else:
        # No tomllib (Python 3.10, e.g. an RPM build root): the tables are simple to read.
        text = raw.decode("utf-8")
        block = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
        found = dict(re.findall(r'^\s*"?([\w.-]+)"?\s*=\s*"([^"]+)"', block, re.M))
        listed = re.search(r"^script-files\s*=\s*\[([^]]*)\]", text, re.M)
        files = re.findall(r'"([^"]+)"', listed.group(1)) if listed else []
    base = os.path.dirname(os.path.abspath(pyproject))
    for path in files:
        with open(os.path.join(base, path), encoding="utf-8") as fh:
            target = re.search(r"^from ([\w.]+) import (\w+)$", fh.read(), re.M)
        if target is None:
            raise SystemExit(f"install-scripts: no 'from module import function' in {path}")
        found[os.path.basename(path)] = f"{target.group(1)}:{target.group(2)}"
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", required=True, help="package tree (DESTDIR)")
    parser.add_argument("--pyproject", default="pyproject.toml")
    parser.add_argument("--python", default="/usr/bin/python3", help="interpreter for #!")
    parser.add_argument(
        "--sitelib",
        action="append",
        help="folder holding the package and its dependencies, put on sys.path by the"
        " wrapper (repeatable; default /usr/lib/python3/dist-packages)",
    )
    parser.add_argument("--sbin", default="/usr/sbin", help="folder for sendmail/newaliases")
    parser.add_argument("--bin", default="/usr/bin", help="folder for the other commands")
    parser.add_argument("--suffix", default="", help="added to MTA names (.mailshim for RPM)")
    parser.add_argument(
        "--newaliases-in-bin", action="store_true", help="newaliases in --bin (Fedora)"
    )
    args = parser.parse_args(argv)
    sitelib = args.sitelib or ["/usr/lib/python3/dist-packages"]

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
                    python=args.python,
                    name=name,
                    target=target,
                    module=module,
                    func=func,
                    sitelib=sitelib,
                )
            )
        os.chmod(path, 0o755)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
