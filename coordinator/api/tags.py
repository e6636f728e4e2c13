"""Tags in text that arrives in pieces: what to hold back because a tag may be starting."""

from __future__ import annotations


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is the start of `tag` (but not all of it):
    those characters wait for the next piece before they can be called text."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def partial_tag_after_space(text: str, tag: str) -> int:
    """As `partial_tag`, with the white space before it: white space right before a tag
    belongs to neither side of it."""
    n = partial_tag(text, tag)
    return len(text) - len(text[:len(text) - n].rstrip())
