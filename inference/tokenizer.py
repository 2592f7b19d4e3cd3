"""The RWKV world tokenizer (rwkv_vocab_v20230424, shipped in the `rwkv` package),
with decoding that never loses text to one bad byte.

The package's own `decode` turns a whole text into a lone U+FFFD as soon as
one byte is not valid UTF-8; here each invalid byte becomes one U+FFFD and the
rest survives. `StreamDecoder` decodes a growing token sequence without ever
emitting half a character.
"""

import codecs
import functools
from pathlib import Path

import rwkv
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

VOCAB_FILE = Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"


class WorldTokenizer:
    def __init__(self, vocab_file=VOCAB_FILE):
        self._trie = TRIE_TOKENIZER(str(vocab_file))
        self.pieces = self._trie.idx2token  # id -> bytes; id 0 (end of text) has none
        self.vocab_size = max(self.pieces) + 1

    def encode(self, text):
        return self._trie.encode(text) if text else []

    def encode_bytes(self, data):
        """Tokens spelling exactly these bytes (which need not be valid UTF-8)."""
        return self._trie.encodeBytes(bytes(data)) if data else []

    def decode_bytes(self, tokens):
        pieces = self.pieces
        return b"".join(pieces.get(int(t), b"") for t in tokens)

    def decode(self, tokens):
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")

    def stream(self):
        return StreamDecoder(self)


class StreamDecoder:
    """Decodes tokens one at a time; `text` never ends in half a character."""

    def __init__(self, tokenizer):
        self._pieces = tokenizer.pieces
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.raw = bytearray()
        self.text = ""

    def push(self, token):
        piece = self._pieces.get(int(token), b"")
        self.raw += piece
        self.text += self._decoder.decode(piece)
        return self.text

    def finish(self):
        """Flush a dangling partial character (as U+FFFD) at the end of the stream."""
        self.text += self._decoder.decode(b"", final=True)
        return self.text


@functools.cache
def world_tokenizer():
    """The process-wide tokenizer (building its trie takes about a second)."""
    return WorldTokenizer()
