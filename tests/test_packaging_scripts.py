"""packaging/install-scripts.py: the distribution packages' command wrappers.

Since issue 14 only ``mailshim`` is a ``[project.scripts]`` entry; ``sendmail``, ``mailq`` and
``newaliases`` are plain scripts for pip (``packaging/scripts/``, listed in ``[tool.setuptools]
script-files``). The .deb and .rpm wrappers must still cover all four, run with ``-I -S`` (no
``site``: the wrapper puts the package's folder on ``sys.path`` itself), and work: each is
written into a throwaway root and run for real, finding mailshim only through that folder.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "packaging" / "install-scripts.py"
TARGETS = {
    "sendmail": "mailshim.cli.sendmail:main",
    "mailq": "mailshim.cli.sendmail:main_mailq",
    "newaliases": "mailshim.cli.sendmail:main_newaliases",
    "mailshim": "mailshim.cli.entry:main",
}


def install(root: Path, *extra: str) -> None:
    argv = [sys.executable, "-I", str(SCRIPT), "--root", str(root), "--python", sys.executable]
    subprocess.run(
        [*argv, "--sitelib", str(REPO / "src"), *extra],
        check=True,
        cwd=REPO,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("layout", "extra", "where"),
    [
        (
            "debian",
            (),
            {"sendmail": "usr/sbin", "newaliases": "usr/sbin", "mailq": "usr/bin"},
        ),
        (
            "rpm",
            ("--suffix", ".mailshim", "--newaliases-in-bin"),
            {
                "sendmail.mailshim": "usr/sbin",
                "newaliases.mailshim": "usr/bin",
                "mailq.mailshim": "usr/bin",
            },
        ),
    ],
)
def test_every_command_gets_an_isolated_wrapper(tmp_path, layout, extra, where):
    # a stale generic wrapper from the build tool is replaced, as pybuild's is
    stale = tmp_path / "usr" / "bin" / "sendmail"
    stale.parent.mkdir(parents=True)
    stale.write_text("#!/bin/sh\nexit 99\n")
    install(tmp_path, *extra)
    found = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    expected = {**where, "mailshim": "usr/bin"}
    assert found == sorted(f"{folder}/{name}" for name, folder in expected.items())
    for name, folder in expected.items():
        text = (tmp_path / folder / name).read_text()
        module, func = TARGETS[name.split(".")[0]].split(":")
        assert text.startswith(f"#!{sys.executable} -IS\n"), text
        assert f"sys.path.extend({[str(REPO / 'src')]!r})\n" in text
        assert f"from {module} import {func}\nsys.exit({func}())\n" in text


def test_the_wrappers_run(tmp_path):
    # the interpreter is the test venv's, where mailshim is an editable install that only
    # `site` would find: under -S the wrapper's own sys.path entry (the source tree) must
    install(tmp_path)
    env = {"MAILSHIM_CONFIG": str(tmp_path / "none.toml"), "HOME": str(tmp_path)}
    aliases = subprocess.run(
        [str(tmp_path / "usr" / "sbin" / "newaliases")], env=env, capture_output=True, timeout=60
    )
    assert (aliases.returncode, aliases.stderr) == (0, b"")
    bad = subprocess.run(
        [str(tmp_path / "usr" / "sbin" / "sendmail"), "-X"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert bad.returncode == 64 and bad.stderr.count(b"\n") == 1, bad.stderr
