"""OpenAI CLIP's caption cleaning (ftfy.fix_text, HTML unescape twice, whitespace collapsed, lower case), with
exact shortcuts around ftfy: the same text as ftfy gives, at a fraction of its cost per caption.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Callable, Iterable

import ftfy
import ftfy.badness
import ftfy.chardata
import ftfy.fixes

try:  # Python >= 3.11
    from re import _compiler as sre_compile
    from re import _constants as sre_constants
    from re import _parser as sre_parse
except ImportError:  # Python 3.10
    import sre_compile
    import sre_constants
    import sre_parse

# OpenAI cleans a caption with ftfy.fix_text, html.unescape twice, whitespace collapsing and lower(). ftfy
# costs 15-100 us per caption, more than all the rest of OpenCLIP's tokenizer, so `fix_text` below returns
# ftfy's result while skipping the ftfy steps that provably leave the text unchanged. It is only trusted for
# the ftfy versions it was checked against (tests/core/test_tokenizer.py fuzzes it against ftfy.fix_text);
# any other version makes it call ftfy.fix_text itself.
FTFY_CHECKED_VERSIONS = ("6.3.1",)
FTFY_SHORTCUTS = ftfy.__version__ in FTFY_CHECKED_VERSIONS
FTFY_MAX_SEGMENT = ftfy.TextFixerConfig().max_decode_length


def _char_class(codepoints: Iterable[int]) -> re.Pattern:
    """A regex matching one character out of `codepoints`."""
    ranges: list[list[int]] = []
    for c in sorted(set(codepoints)):
        if ranges and c == ranges[-1][1] + 1:
            ranges[-1][1] = c
        else:
            ranges.append([c, c])
    return re.compile("[" + "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges) + "]")


# ftfy's per-character fixers, in the order ftfy applies them after fix_encoding, each with every character
# it acts on: a fixer returns text without those characters unchanged.
CHARACTER_FIXERS: tuple[tuple[Callable[[str], str], frozenset[str]], ...] = tuple(
    (fixer, frozenset(map(chr, codepoints)))
    for fixer, codepoints in (
        (ftfy.fixes.fix_c1_controls, range(0x80, 0xA0)),
        (ftfy.fixes.fix_latin_ligatures, ftfy.chardata.LIGATURES),
        (ftfy.fixes.fix_character_width, ftfy.chardata.WIDTH_MAP),
        (ftfy.fixes.uncurl_quotes, [0x2BC, *range(0x2018, 0x2020)]),
        (ftfy.fixes.fix_line_breaks, [0x0D, 0x85, 0x2028, 0x2029]),
        (ftfy.fixes.fix_surrogates, range(0xD800, 0xE000)),
        (ftfy.fixes.remove_terminal_escapes, [0x1B]),
        (ftfy.fixes.remove_control_chars, ftfy.chardata.CONTROL_CHARS),
    )
)
FIXER_TRIGGER_RE = _char_class(ord(c) for _, chars in CHARACTER_FIXERS for c in chars)


def _element_chars(op, av) -> set[int] | None:
    """The characters one parsed regex element matches, if it is a literal or a plain character class."""
    if op is sre_constants.LITERAL:
        return {av}
    if op is sre_constants.IN and all(o in (sre_constants.LITERAL, sre_constants.RANGE) for o, _ in av):
        chars: set[int] = set()
        for o, a in av:
            chars.update([a] if o is sre_constants.LITERAL else range(a[0], a[1] + 1))
        return chars
    return None


def _required_non_ascii(items) -> set[int] | None:
    """A small set of non-ASCII characters such that every match of the parsed `items` contains one of them,
    or None when the pattern's structure does not show one."""
    candidates = []
    for op, av in items:
        chars = _element_chars(op, av)
        if op is sre_constants.BRANCH:
            per_branch = [_required_non_ascii(b) for b in av[1]]
            chars = set().union(*per_branch) if all(per_branch) else None
        elif op is sre_constants.SUBPATTERN:
            chars = _required_non_ascii(av[-1])
        elif op in (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT) and av[0] >= 1:
            chars = _required_non_ascii(av[2])
        if chars and min(chars) >= 0x80:
            candidates.append(chars)
    return min(candidates, key=len) if candidates else None


def _opcodes(items) -> set:
    """Every opcode (and anchor kind) used anywhere in the parsed `items`."""
    ops = set()
    for op, av in items:
        ops.add(op)
        if op is sre_constants.BRANCH:
            for b in av[1]:
                ops |= _opcodes(b)
        elif op is sre_constants.SUBPATTERN:
            ops |= _opcodes(av[-1])
        elif op in (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT):
            ops |= _opcodes(av[2])
        elif op is sre_constants.AT:
            ops.add(av)
    return ops


LOCAL_OPS = {
    sre_constants.LITERAL, sre_constants.NOT_LITERAL, sre_constants.IN, sre_constants.ANY, sre_constants.BRANCH,
    sre_constants.SUBPATTERN, sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.AT,
    sre_constants.AT_BEGINNING, sre_constants.AT_BEGINNING_STRING,
}  # fmt: skip


def _badness_branches() -> tuple[re.Pattern, dict[str, tuple[tuple[re.Pattern, int], ...]]] | None:
    """Split ftfy's mojibake detector BADNESS_RE into its alternatives. Each alternative matches at most 7
    characters, one of which comes from a small set of non-ASCII characters. Returns a regex for all those
    characters and, for each of them, the alternatives (compiled alone) that need it with their longest match.
    None if the installed pattern lacks that shape or has anything that looks outside its match (lookarounds,
    end anchors, back references) or ignores case."""
    pattern = ftfy.badness.BADNESS_RE
    parsed = sre_parse.parse(pattern.pattern, pattern.flags)
    if pattern.flags & re.IGNORECASE or len(parsed) != 1 or parsed[0][0] is not sre_constants.BRANCH:
        return None
    by_char: dict[str, list[tuple[re.Pattern, int]]] = {}
    for branch in parsed[0][1][1]:
        required = _required_non_ascii(branch)
        longest = branch.getwidth()[1]
        if not required or longest > 32 or not _opcodes(branch) <= LOCAL_OPS:
            return None
        compiled = sre_compile.compile(branch, pattern.flags)
        for c in required:
            by_char.setdefault(chr(c), []).append((compiled, longest))
    return _char_class(map(ord, by_char)), {c: tuple(alternatives) for c, alternatives in by_char.items()}


BADNESS_BRANCHES = _badness_branches()


def is_mojibake(text: str) -> bool:
    """ftfy.badness.is_bad(text), trying only the alternatives of its regex that can match around each of the
    characters they need. is_bad tries all ~40 alternatives from every position (about 25 us a caption)."""
    if BADNESS_BRANCHES is None:
        return ftfy.badness.is_bad(text)
    required_re, alternatives_by_char = BADNESS_BRANCHES
    for n, hit in enumerate(required_re.finditer(text)):
        if n == 24:  # text full of such characters (some Cyrillic): one full scan is cheaper
            return ftfy.badness.is_bad(text)
        p = hit.start()
        for alternative, longest in alternatives_by_char[hit.group()]:
            # a match holding position p lies within `longest` of it; '^' still only matches at 0
            if alternative.search(text, max(0, p - longest + 1), p + longest):
                return True
    return False


def _fix_segment(text: str, unescape_html: bool) -> str:
    """ftfy's fix-until-stable loop over one segment, skipping each step that cannot change the text."""
    while True:
        before = text
        if unescape_html and "&" in text:  # ftfy's entity regex starts with '&'
            text = ftfy.fixes.unescape_html(text)
        if not text.isascii() and is_mojibake(text):  # fix_encoding returns other text unchanged
            text = ftfy.fix_encoding(text)
        present = set(FIXER_TRIGGER_RE.findall(text))
        if present:
            for fixer, triggers in CHARACTER_FIXERS:
                if not triggers.isdisjoint(present):
                    text = fixer(text)
                    present = set(FIXER_TRIGGER_RE.findall(text))
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def fix_text(text: str) -> str:
    """ftfy.fix_text(text) with ftfy's default settings, computed with fewer steps (same result)."""
    if not FTFY_SHORTCUTS:
        return ftfy.fix_text(text)
    # Like ftfy: each line is fixed on its own (cut every FTFY_MAX_SEGMENT characters), and once a line
    # contains '<' (looks like HTML) entities are left alone in it and in all later lines.
    out = []
    unescape_html = True
    pos = 0
    while pos < len(text):
        end = min(text.find("\n", pos) + 1 or len(text), pos + FTFY_MAX_SEGMENT)
        segment = text[pos:end]
        unescape_html = unescape_html and "<" not in segment
        out.append(_fix_segment(segment, unescape_html))
        pos = end
    return "".join(out)


# Printable ASCII plus tab, line feed, form feed and carriage return, without '&'. On such text every ftfy
# step is the identity except that CR becomes LF, and html.unescape has nothing to decode, so cleaning
# is just whitespace collapsing and lower().
PLAIN_ASCII_RE = re.compile(r"[\t\n\x0c\r\x20-\x25\x27-\x7e]*")


def is_plain_ascii(text: str) -> bool:
    """Whether cleaning `text` needs neither ftfy nor html.unescape (see PLAIN_ASCII_RE)."""
    if not (FTFY_SHORTCUTS and text.isascii() and "&" not in text):
        return False
    return text.isprintable() or PLAIN_ASCII_RE.fullmatch(text) is not None


def fix_and_unescape(text: str) -> str:
    """The cleaning before whitespace collapsing and lower case: ftfy, then HTML unescape twice."""
    if is_plain_ascii(text):
        return text
    return html.unescape(html.unescape(fix_text(text)))


def clean_text(text: str) -> str:
    """OpenAI CLIP's caption cleaning ('lower' in OpenCLIP): ftfy, HTML unescape twice, collapse whitespace,
    lower case."""
    return " ".join(fix_and_unescape(text).split()).lower()
