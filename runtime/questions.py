"""A question as the text decoder takes it, checked before any graph runs, and its answer's text as it comes.

`checked_question` is the one place that decides whether a question can be asked and how long its answer may be
(`Stream.ask`, `ask_streams` and the Triton model all go through it), so that a server can refuse a request whole
before any of its steps runs.
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass

from .bundle.tokenizer import ByteTokenizer
from .errors import InputError
from .sampling import as_integer


@dataclass(frozen=True)
class Question:
    text: str
    prompt: list[int]  # the ids it is asked with (BOS, the question, a newline)
    max_new_tokens: int  # most answer tokens: at least 1, at most what the text context leaves


def checked_question(tokenizer: ByteTokenizer, context: int, default: int, question: object,
                     max_new_tokens: object = None) -> Question:
    """`question` checked for a text decoder of `context` tokens: a non-empty str, short enough to leave room for an
    answer; `max_new_tokens` an int in [1, what the question leaves], or None: `default`, or what the question
    leaves where that is less. Anything else raises InputError naming the limit."""
    if not isinstance(question, str):
        raise InputError(f"ask: the question must be a str, got {type(question).__name__}")
    if not question.strip():
        raise InputError("ask: the question is empty")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as bad:
        raise InputError(f"ask: the question is not valid text: {bad}") from None
    prompt = tokenizer.prompt(question)
    room = context - len(prompt)
    if room < 1:
        raise InputError(f"ask: the question is {len(prompt)} tokens with its markers; the text decoder's "
                         f"context holds {context}")
    if max_new_tokens is None:
        max_new_tokens = min(default, room)
    count = as_integer(max_new_tokens)
    if count is None or not 1 <= count <= room:
        raise InputError(f"ask: max_new_tokens must be an int in [1, {room}] for this question "
                         f"(context {context} - prompt {len(prompt)}), got {max_new_tokens!r}")
    return Question(question, prompt, count)


class TextPieces:
    """An answer's text as its byte tokens come, whole UTF-8 characters at a time (special tokens give nothing)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token: int | None) -> str:
        """The text that `token` completes ("" while a character is unfinished, or for None and special ids)."""
        return self._decoder.decode(bytes([token])) if token is not None and 0 <= token < 256 else ""

    def end(self) -> str:
        """What is left at the answer's end (an unfinished character, replaced)."""
        return self._decoder.decode(b"", final=True)
