"""Fonts for text the default font cannot draw: CJK, Devanagari or emoji class names.

:func:`fonts_for` draws a figure's texts with the installed fonts that have
their glyphs, picked one at a time until every character is covered. A note
names what no installed font can draw, once per process, with a hint that fits
it (a CJK font for CJK, an outline emoji font for emoji), instead of
matplotlib's warning per glyph.
"""

from __future__ import annotations

import functools
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from matplotlib import font_manager, rc_context, rcParams
from matplotlib.font_manager import FontEntry
from matplotlib.ft2font import FT2Font

MISSING_FONT_HINT = "install a CJK font such as fonts-noto-cjk"
EMOJI_FONT_HINT = ("for emoji install an outline emoji font such as fonts-symbola "
                   "(matplotlib cannot draw colour emoji fonts)")
OTHER_SCRIPT_FONT_HINT = "install a font that has them, such as fonts-noto-core"
# Code point ranges of emoji, their modifiers and joiners (skin tones, U+200D, variation selectors, tags).
EMOJI_RANGES = ((0x1F000, 0x1FAFF), (0x2600, 0x27BF), (0x2300, 0x23FF), (0x2B00, 0x2BFF), (0xFE00, 0xFE0F),
                (0x200D, 0x200D), (0x20E3, 0x20E3), (0xE0000, 0xE007F))
# FreeType's FT_FACE_FLAG_SCALABLE: the font has outlines. Bitmap-only fonts (colour emoji) cannot be drawn
# at an arbitrary size: matplotlib fails with "Could not set the fontsize".
FT_FACE_FLAG_SCALABLE = 1
# Fonts that map every character to a placeholder box (matplotlib ships "Last Resort High-Efficiency"):
# choosing one as fallback would hide that the real glyphs are missing.
PLACEHOLDER_FONT_PREFIXES = ("Last Resort",)
_GLYPH_WARNING = r"Glyph \d+ .* missing from font"
# Characters already named in a "no installed font" note: each is reported once per process,
# not once per figure (training and evaluation draw the same class names several times).
_REPORTED_MISSING_GLYPHS: set[str] = set()


def _is_scalable(font: FT2Font) -> bool:
    """True when ``font`` has outlines, so matplotlib can draw it at any size (colour emoji fonts are bitmaps)."""
    flags = font.face_flags  # an int before matplotlib 3.10, a FaceFlags enum since
    return bool(int(getattr(flags, "value", flags)) & FT_FACE_FLAG_SCALABLE)


def _glyphs_in_font(font_path: str, chars: frozenset[str]) -> frozenset[str]:
    """The characters of ``chars`` that the font file at ``font_path`` can draw (none if unreadable or bitmap-only)."""
    try:
        font = FT2Font(font_path)
    except (OSError, RuntimeError):
        return frozenset()
    if not _is_scalable(font):
        return frozenset()
    return frozenset(char for char in chars if font.get_char_index(ord(char)))


def _chars_missing_from_default_font(texts: Iterable[str]) -> frozenset[str]:
    """The characters of ``texts`` the default font has no glyph for; plain ASCII returns at once."""
    chars = frozenset(char for text in texts for char in text if not char.isascii() and not char.isspace())
    if not chars:
        return chars
    default_font = font_manager.findfont(font_manager.FontProperties())
    return chars - _glyphs_in_font(default_font, chars)


def fallback_font_family(chars: frozenset[str], fonts: Sequence[FontEntry]) -> tuple[str | None, frozenset[str]]:
    """The family of the font in ``fonts`` with glyphs for most of ``chars``, and the characters it lacks.

    The first font that has them all wins; ``(None, chars)`` when no font has any.
    Placeholder fonts (``PLACEHOLDER_FONT_PREFIXES``) are never chosen.
    """
    best_family, best_covered = None, frozenset()
    for font in fonts:
        if font.name.startswith(PLACEHOLDER_FONT_PREFIXES):
            continue
        covered = _glyphs_in_font(font.fname, chars)
        if len(covered) > len(best_covered):
            best_family, best_covered = font.name, covered
            if covered == chars:
                break
    return best_family, chars - best_covered


def fallback_font_families(chars: frozenset[str], fonts: Sequence[FontEntry]) -> tuple[tuple[str, ...], frozenset[str]]:
    """Families from ``fonts`` that together have glyphs for ``chars``, and the characters none of them has.

    Picked one at a time with :func:`fallback_font_family` (the font with most of
    the characters still lacking), so CJK and, say, Devanagari names in one
    figure each get a font that has them.
    """
    families: list[str] = []
    lacking = chars
    while lacking:
        family, still_lacking = fallback_font_family(lacking, fonts)
        if family is None:
            break
        families.append(family)
        lacking = still_lacking
    return tuple(families), lacking


@functools.lru_cache(maxsize=64)
def _installed_fallback_families(chars: frozenset[str]) -> tuple[tuple[str, ...], frozenset[str]]:
    """:func:`fallback_font_families` over the installed fonts, cached: scanning opens every font file."""
    return fallback_font_families(chars, font_manager.fontManager.ttflist)


def _is_emoji(char: str) -> bool:
    """True for an emoji or a character that joins or modifies one (see ``EMOJI_RANGES``)."""
    return any(low <= ord(char) <= high for low, high in EMOJI_RANGES)


def _font_hints(missing: frozenset[str]) -> list[str]:
    """What to install for the characters no font has: a CJK font, an outline emoji font, or a broad one."""
    emoji = {char for char in missing if _is_emoji(char)}
    wide = {char for char in missing - emoji if unicodedata.east_asian_width(char) in ("W", "F")}
    hints = [MISSING_FONT_HINT] if wide else []
    hints += [EMOJI_FONT_HINT] if emoji else []
    return hints + ([OTHER_SCRIPT_FONT_HINT] if missing - emoji - wide else [])


def missing_glyphs_note(texts: Sequence[str], missing: frozenset[str]) -> str:
    """The note naming the words of ``texts`` whose ``missing`` characters show as boxes, and what to install."""
    words = list(dict.fromkeys(word for text in texts for word in text.split() if missing & set(word)))
    shown = ", ".join(words[:3]) + (", ..." if len(words) > 3 else "")
    return (f"note: no installed font has the glyphs of {len(words)} label(s) ({shown}); "
            f"they show as boxes in the figures; {'; '.join(_font_hints(missing))}")


def _note_missing_glyphs(texts: list[str], missing: frozenset[str]) -> None:
    """Print :func:`missing_glyphs_note`, unless all of ``missing`` was reported before (or there is none)."""
    if missing <= _REPORTED_MISSING_GLYPHS:
        return
    _REPORTED_MISSING_GLYPHS.update(missing)
    print(missing_glyphs_note(texts, missing))


@contextmanager
def fonts_for(texts: Iterable[str]) -> Iterator[None]:
    """Draw ``texts`` with installed fallback fonts for the characters the default font lacks.

    Characters that no installed font has are named in one note instead of
    matplotlib's warning per glyph. Costs nothing when the default font has
    every character.
    """
    texts = [str(text) for text in texts]
    missing = _chars_missing_from_default_font(texts)
    if not missing:
        yield
        return
    fallbacks, unavailable = _installed_fallback_families(missing)
    _note_missing_glyphs(texts, unavailable)
    families = list(rcParams["font.family"]) + list(fallbacks)
    with rc_context({"font.family": families}), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_GLYPH_WARNING)
        yield
