"""The README's commands work as written: on a machine where root has no `sudo`."""

from __future__ import annotations

import re

from conftest import REPO


def readme_code() -> list[str]:
    """Every indented (4+ spaces) or fenced code line of README.md."""
    text = (REPO / "README.md").read_text()
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    indented = [line for line in text.splitlines() if line.startswith("    ")]
    return indented + [line for block in fenced for line in block.splitlines()]


def test_readme_commands_do_not_use_sudo():
    assert [line for line in readme_code() if re.search(r"\bsudo\b", line)] == []
