"""Byte-level tokenizer: 256 byte values plus BOS, EOS and PAD. Nothing to download."""
from __future__ import annotations

from collections.abc import Iterable


class ByteTokenizer:
    """UTF-8 bytes are token ids 0..255; specials follow."""

    BOS = 256
    EOS = 257
    PAD = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Bytes back to text; special ids are dropped, invalid UTF-8 is replaced, never raised."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def prompt(self, question: str) -> list[int]:
        """The ids a question is asked with: BOS, the question, a newline; the answer follows."""
        return [self.BOS, *self.encode(question.strip()), *self.encode("\n")]

    def to_dict(self) -> dict[str, object]:
        return {"kind": "bytes", "bos": self.BOS, "eos": self.EOS, "pad": self.PAD, "vocab_size": self.vocab_size}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> "ByteTokenizer":
        expected = cls().to_dict()
        if data != expected:
            raise ValueError(f"unsupported tokenizer {data}; this runtime knows {expected}")
        return cls()
