"""The one sanitiser of text someone else chose (bract.records.text.one_line)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from bract.records.text import TRUNCATED, one_line

_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
                          "\ud800-\udfff]")


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(), st.text(alphabet=st.characters(codec=None), max_size=3000),
                      st.binary().map(lambda b: b.decode("latin-1"))),
       limit=st.integers(len(TRUNCATED) + 1, 600))
def test_one_line_is_printable_bounded_and_idempotent(text, limit) -> None:
    """Whatever the text: no control character, separator, bidi override or surrogate;
    no line break, no doubled or surrounding whitespace; at most ``limit`` characters,
    marked when cut; sanitising again changes nothing; a text already clean and short
    enough comes back unchanged."""
    out = one_line(text, limit)
    assert not _UNPRINTABLE.search(out)
    assert out == " ".join(out.split()) and len(out) <= limit
    assert one_line(out, limit) == out
    if len(" ".join(_UNPRINTABLE.sub(" ", text).split())) > limit:
        assert out.endswith(TRUNCATED)
    if text == " ".join(text.split()) and not _UNPRINTABLE.search(text) and len(text) <= limit:
        assert out == text


def test_one_line_reads_a_bounded_head_of_a_huge_text() -> None:
    """A 64 MiB reason is cut from its first characters, saying so."""
    out = one_line("\x1b[31m" + "x" * 64 * 2**20)
    assert out.startswith("[31mx") and out.endswith(TRUNCATED) and len(out) <= 500
