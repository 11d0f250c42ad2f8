"""Hypothesis strategies for adversarial strings: all of Unicode, plus the characters that break parsers.

Every strategy here draws from the whole of Unicode as the wire allows it. Surrogates
(U+D800..U+DFFF) are left out on purpose: a proto3 `string` must be valid UTF-8, and
protobuf's Python runtime refuses to serialize a str holding a lone surrogate (it raises
on the client, before anything is sent), so a server can never receive one. `st.text()`
leaves them out by default, and so does every strategy below.

Besides `st.text()`, the strategies mix in the inputs most likely to slip past a check:
digits of other scripts ("²", "٣", "߃", "३", fullwidth "３", which `str.isdigit()`,
`int()` or `float()` accept), format characters (zero-width space U+200B, word joiner
U+2060, BOM U+FEFF, right-to-left override U+202E), NUL and other controls, Unicode
whitespace, very long strings, and exit-policy strings `<known policy>:<weird number>`.

The oracle helpers at the end (`is_blank`, `policy_verdict`) say which answer a string
must get; they are the executable form of the contract the property tests check.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

import grpc
from hypothesis import strategies as st

# -- characters ------------------------------------------------------------------------

# The zero of some decimal-digit blocks: chr(ord(zero) + d) is that script's digit d.
DIGIT_ZEROS = ("٠", "۰", "߀", "०", "০", "੦", "૦", "୦", "௦", "౦", "೦", "൦", "෦", "๐", "໐", "༠", "၀", "႐",
               "០", "᠐", "᥆", "᧐", "᪀", "᭐", "᱀", "꘠", "꣐", "꤀", "꧐", "꩐", "꯰", "０", "𐒠", "𑁦", "𝟎", "𝟘",
               "𝟢", "𝟬", "𝟶", "🯰")
SUPERSCRIPTS = "⁰¹²³⁴⁵⁶⁷⁸⁹"
SUBSCRIPTS = "₀₁₂₃₄₅₆₇₈₉"
# Numeric characters that are not ASCII digits: superscripts, circled and parenthesised numbers,
# Roman numerals, fractions, CJK and Ethiopic numbers, other decimal separators and signs.
OTHER_NUMERIC = ("²", "³", "¹", "٣", "߃", "३", "３", "①", "⑴", "⒊", "❸", "Ⅲ", "ⅲ", "〣", "፫", "〇", "三", "½",
                 "⅓", "𝟑", "٫", "٬", "．", "，", "−", "－", "＋", "⁺", "⁻", "ｅ", "∞")
FORMAT_CHARS = ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u202e", "\u202a", "\u202c", "\u200e", "\u200f",
                "\u2066", "\u2069", "\u00ad", "\u180e", "\u2061", "\u2062", "\u2063", "\u2064", "\u206f",
                "\U000e0001", "\U000e0020")
WHITESPACE = (" ", "\t", "\n", "\r", "\x0b", "\x0c", "\x1c", "\x1f", "\x85", "\u00a0", "\u1680", "\u2000", "\u2007",
              "\u200a", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000")
CONTROLS = ("\x00", "\x01", "\x07", "\x1b", "\x7f", "\x9f")
# Visible but odd: combining marks, private use, noncharacters, emoji sequences, RTL letters.
ODD_VISIBLE = ("\u0301", "\u034f", "\ue000", "\U000f0000", "\ufffd", "\ufffe", "\uffff", "\U0010ffff", "👍🏽",
               "👨\u200d👩\u200d👧", "🇫🇷", "א", "ع", "ﷺ", "𒐫", "ǅ", "ß", "İ", "ﬃ", "{", "}", "{text}", "{mask}",
               "%s", "\\", "'", '"', "'; DROP TABLE tasks; --", "../", "*", "?", "NaN")

other_digits = st.one_of(
    st.sampled_from(OTHER_NUMERIC),
    st.sampled_from(SUPERSCRIPTS + SUBSCRIPTS),
    st.builds(lambda z, d: chr(ord(z) + d), st.sampled_from(DIGIT_ZEROS), st.integers(0, 9)),
    st.characters(categories=("Nd", "Nl", "No"), exclude_characters="0123456789"),
)
format_chars = st.one_of(st.sampled_from(FORMAT_CHARS), st.characters(categories=["Cf"]))
whitespace_chars = st.one_of(st.sampled_from(WHITESPACE), st.characters(categories=("Zs", "Zl", "Zp")))
invisible_chars = st.one_of(format_chars, whitespace_chars, st.sampled_from(CONTROLS[1:]))

# A piece of a weird string: one targeted character, or a short run of anything.
_pieces = st.one_of(
    other_digits, format_chars, whitespace_chars, st.sampled_from(CONTROLS), st.sampled_from(ODD_VISIBLE),
    st.text(max_size=6), st.sampled_from(["a", "good", "movie", "sentiment", "positive", "negative", "0", "3"]),
)

# Only invisible characters (possibly none): must count as empty wherever emptiness is checked.
zero_width_strings = st.lists(format_chars, min_size=1, max_size=6).map("".join)
blank_strings = st.one_of(st.lists(invisible_chars, max_size=6).map("".join), zero_width_strings)


def long_strings(min_size: int = 1_000, max_size: int = 30_000) -> st.SearchStrategy[str]:
    """Long strings, built by repetition (generating them character by character is slow)."""
    return st.builds(lambda unit, n, tail: (unit * n)[:max_size] + tail,
                     st.one_of(st.text(min_size=1, max_size=4), st.sampled_from(FORMAT_CHARS + ("x", "²", "\x00"))),
                     st.integers(min_size, max_size), st.text(max_size=3))


def weird_strings(max_size: int = 40, long: bool = True) -> st.SearchStrategy[str]:
    """Any string the wire can carry: st.text() over all of Unicode, mixed with targeted characters."""
    parts: list[st.SearchStrategy[str]] = [
        st.text(max_size=max_size),
        st.lists(_pieces, max_size=8).map("".join),
        blank_strings,
        st.just(""),
        st.just("\x00"),
    ]
    if long:
        parts.append(long_strings())
    return st.one_of(*parts)


def near_misses(name: str) -> st.SearchStrategy[str]:
    """`name` changed in a way that must not be mistaken for it: case, fullwidth, format or space characters."""
    fullwidth = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in name)
    return st.one_of(
        st.sampled_from([name.upper(), name.title(), fullwidth, name + "\n", " " + name, name + " ", name + "\x00",
                         name[:-1], name + name[-1], "\u202e" + name[::-1]]),
        st.builds(lambda i, c: name[:i] + c + name[i:], st.integers(0, len(name)),
                  st.one_of(format_chars, whitespace_chars, st.sampled_from(CONTROLS))),
    )


# -- numbers and exit policies ------------------------------------------------------------

PARAMETRISED_POLICIES = ("static", "paper-tol", "confidence", "knn-agree")
PLAIN_POLICIES = ("paper", "paper-all", "full", "knn-vote", "auto")
FLOAT_POLICIES = ("paper-tol", "confidence")
INT_POLICIES = ("static", "knn-agree")


def _transliterate(number: str, zero: str) -> str:
    return "".join(chr(ord(zero) + int(c)) if c.isdigit() else c for c in number)


ascii_numbers = st.one_of(
    st.integers(0, 12).map(str), st.integers(0, 10**7).map(str), st.integers(-3, -1).map(str),
    st.floats(0, 1).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "1", "2", "3", "4", "5", "03", "0.5", ".5", "5.", "1.0", "0.0", "1e-1", "1E0", "+1", "-0",
                     "0x1", "0b1", "1_0", "0.5_0", "nan", "NaN", "inf", "-inf", "Infinity", "1.", ".", "", "..",
                     "0.5.5", "1/2", "9" * 19, "1" * 4301, "0" * 5000 + "1"]),
)
weird_numbers = st.one_of(
    ascii_numbers,
    other_digits,
    other_digits,
    st.lists(other_digits, min_size=1, max_size=4).map("".join),
    st.builds(_transliterate, st.one_of(st.integers(0, 9999).map(str), st.floats(0, 1).map(str),
                                        st.sampled_from(["0.5", "0.7", "1", "2", "3"])),
              st.sampled_from(DIGIT_ZEROS)),
    st.builds(lambda n, s: n.translate(str.maketrans("0123456789", s)), st.integers(0, 99).map(str),
              st.sampled_from([SUPERSCRIPTS, SUBSCRIPTS])),
    # An ASCII number with an invisible, space or foreign character inside or around it.
    st.builds(lambda n, i, c: n[:i] + c + n[i:], st.sampled_from(["2", "3", "0.5", "0.7", "12"]), st.integers(0, 4),
              st.one_of(format_chars, whitespace_chars, other_digits, st.sampled_from(CONTROLS))),
    st.text(max_size=8),
)


def _policy_name_variants() -> st.SearchStrategy[str]:
    known = st.sampled_from(PARAMETRISED_POLICIES + PLAIN_POLICIES)
    return st.one_of(known, known.flatmap(near_misses))


# The heart of it: every parametrised policy with a weird number (half of all policies drawn).
weird_policy_args = st.builds(lambda name, number: f"{name}:{number}", st.sampled_from(PARAMETRISED_POLICIES),
                              weird_numbers)
policies = st.one_of(
    st.sampled_from(["", *PLAIN_POLICIES, *PARAMETRISED_POLICIES, "static:2", "static:4", "static:9", "knn-agree:2",
                     "confidence:0.7", "paper-tol:0.2", "nope", "static:x", "static:", ":", "static::2"]),
    weird_policy_args, weird_policy_args, weird_policy_args, weird_policy_args, weird_policy_args,
    st.builds(lambda name, number: f"{name}:{number}", st.sampled_from(PLAIN_POLICIES), weird_numbers),
    st.builds(lambda name, number: f"{name}:{number}", _policy_name_variants(), ascii_numbers),
    st.builds(lambda pad, policy, pad2: pad + policy + pad2, st.sampled_from(["", " ", "\t", "\u3000", "\u200b"]),
              st.sampled_from(["static:2", "paper", "auto", "confidence:0.5"]),
              st.sampled_from(["", " ", "\n", "\u00a0", "\ufeff"])),
    st.text(max_size=12),
    long_strings(100, 5_000),
)


# -- the contract, as code --------------------------------------------------------------------

# Invisible: separators (Z*), controls (Cc: NUL included) and format characters (Cf: zero-width
# space, word joiner, BOM, bidi controls). A text or label made only of these is empty.
_INVISIBLE_CATEGORIES = ("Z", "Cc", "Cf")


def is_blank(s: str) -> bool:
    return all(c.isspace() or unicodedata.category(c).startswith(_INVISIBLE_CATEGORIES) for c in s)


IA = grpc.StatusCode.INVALID_ARGUMENT
NF = grpc.StatusCode.NOT_FOUND
AE = grpc.StatusCode.ALREADY_EXISTS


@dataclass
class Verdict:
    """What a request must get: `must` lists reasons it must fail, `may` reasons it may fail (each with
    the codes that fit). No reason at all: it must be answered."""

    must: list[tuple[str, frozenset[grpc.StatusCode]]] = field(default_factory=list)
    may: list[tuple[str, frozenset[grpc.StatusCode]]] = field(default_factory=list)

    def fail(self, why: str, *codes: grpc.StatusCode) -> Verdict:
        self.must.append((why, frozenset(codes or (IA,))))
        return self

    def maybe(self, why: str, *codes: grpc.StatusCode) -> Verdict:
        self.may.append((why, frozenset(codes or (IA,))))
        return self

    def __add__(self, other: Verdict) -> Verdict:
        return Verdict(self.must + other.must, self.may + other.may)

    @property
    def must_fail(self) -> bool:
        return bool(self.must)

    @property
    def must_succeed(self) -> bool:
        return not self.must and not self.may

    @property
    def codes(self) -> frozenset[grpc.StatusCode]:
        return frozenset().union(*(codes for _, codes in self.must + self.may))


_CANONICAL_INT = re.compile(r"[0-9]{1,2}")
_CANONICAL_DECIMAL = re.compile(r"[0-9]{1,3}(\.[0-9]{1,6})?|\.[0-9]{1,6}")


@dataclass(frozen=True)
class PolicyReading:
    """How an accepted policy string must have been read: its name and argument."""

    name: str
    arg: str | None


def policy_verdict(spec: str, depth: int) -> tuple[Verdict, PolicyReading | None]:
    """The answer a ClassifyOptions.policy must get, and how an accepted one must be read.

    Rules: "" is `paper`; names are exact and lower case; `paper`, `paper-all`, `full`,
    `knn-vote` and `auto` take no argument, `static` needs one, the others may have one; numbers in
    arguments are ASCII (a layer: ASCII digits; a threshold: an ASCII decimal in 0..1); `static:<layer>`
    needs layer <= depth.
    Whitespace around the whole string may be ignored or refused; so may an unusual but
    ASCII spelling of a number ("03", "1e-1"). Anything non-ASCII in a number is refused.
    """
    v = Verdict()
    core = spec.strip()
    if core != spec:
        v.maybe(f"policy {spec!r} has whitespace around it")
    if core == "":
        return v, PolicyReading("paper", None)
    name, sep, arg = core.partition(":")
    if name not in PARAMETRISED_POLICIES + PLAIN_POLICIES:
        if name.strip() in PARAMETRISED_POLICIES + PLAIN_POLICIES and name.strip() != "":
            v.maybe(f"policy name {name!r} has whitespace around it")
            name = name.strip()
        else:
            return v.fail(f"unknown policy name {name!r}"), None
    if not sep:
        if name == "static":
            return v.fail("static needs a layer: static:<layer>"), None
        return v, PolicyReading(name, None)
    if name in PLAIN_POLICIES:
        return v.fail(f"policy {name!r} takes no argument"), None
    number = arg
    if number.strip() != number and number.strip():
        v.maybe(f"argument {arg!r} has whitespace around it")
        number = number.strip()
    if not number.isascii():
        return v.fail(f"argument {arg!r} of {name} is not ASCII (numbers in policy args are ASCII)"), None
    if name in INT_POLICIES:
        if not re.fullmatch(r"[0-9]+", number):
            return v.fail(f"argument {arg!r} of {name} is not a layer number"), None
        if not _CANONICAL_INT.fullmatch(number):
            v.maybe(f"layer {number!r} is long or has leading zeros")
        if name == "static" and (len(number.lstrip("0")) > 3 or int(number.lstrip("0") or "0") > depth):
            return v.fail(f"static layer {number!r} beyond the depth {depth}"), None
        return v, PolicyReading(name, number)
    # A threshold in 0..1.
    if _CANONICAL_DECIMAL.fullmatch(number):
        if not 0 <= float(number) <= 1:
            return v.fail(f"{name} threshold {number} outside 0..1"), None
        return v, PolicyReading(name, number)
    try:
        value = float(number)
    except (ValueError, OverflowError):
        return v.fail(f"argument {arg!r} of {name} is not a number"), None
    if not 0 <= value <= 1:  # NaN included
        return v.fail(f"{name} threshold {number} outside 0..1"), None
    return v.maybe(f"threshold {number!r} is an unusual spelling"), PolicyReading(name, number)
