"""Colour text for a terminal: one painter for ``mailq``/``queue`` listings and ``check``.

Trust: pure; whether to colour at all is the caller's decision (``queueview.use_color``). The
text painted must already be printable. Raises ``KeyError`` only for a style the caller's own
table lacks (a programming error).
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = ["RESET", "painter"]

RESET = "\x1b[0m"


def painter(color: bool, styles: Mapping[str, str]) -> Callable[[str, str], str]:
    """``paint(style, text)``: ``text`` in the SGR colour ``styles[style]``, or as is.

    >>> painter(True, {"ok": "32"})("ok", "fine")
    '\\x1b[32mfine\\x1b[0m'
    >>> painter(False, {"ok": "32"})("ok", "fine")
    'fine'
    """

    def paint(style: str, text: str) -> str:
        if not color or not text:
            return text
        return f"\x1b[{styles[style]}m{text}{RESET}"

    return paint
