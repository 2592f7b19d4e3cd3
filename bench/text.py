"""Text of a known length in tokens, and the prompt format the server really uses
(inference/prompt.py, pure Python: no Django, no torch)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference import prompt as prompt_format  # noqa: E402

# A user turn / character that tokenizes predictably (plain ASCII words).
FILLER_WORDS = (
    "the quiet harbor town wakes slowly while fishing boats drift past old stone walls and "
    "gulls argue over bread crumbs near the market where a baker sings about distant mountains "
    "rivers lanterns winter gardens and the long road home through fields of golden wheat"
).split()

_tokenizer = None


def filler_text(words, offset=0):
    """`words` plain words (roughly `words` tokens with the world tokenizer)."""
    return " ".join(FILLER_WORDS[(offset + i) % len(FILLER_WORDS)] for i in range(words))


def tokenizer():
    """The RWKV world tokenizer shipped in the `rwkv` package (no torch needed)."""
    global _tokenizer
    if _tokenizer is None:
        import rwkv
        from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
        _tokenizer = TRIE_TOKENIZER(str(Path(rwkv.__file__).parent / "rwkv_vocab_v20230424.txt"))
    return _tokenizer


def count_tokens(text):
    return len(tokenizer().encode(text)) if text else 0


def text_of_tokens(target, offset=0):
    """Filler text of about `target` tokens (within a token or two)."""
    words = max(1, target)
    text = filler_text(words, offset)
    while count_tokens(text) > target and words > 1:
        words -= max(1, (count_tokens(text) - target) // 2)
        text = filler_text(max(words, 1), offset)
    return text


def user_turn_tokens(user, bot, prompt):
    """Tokens the server reads for a user turn before the reply
    (inference.prompt.user_turn). Used only to split a /debug/token delta
    into prompt and generated tokens."""
    return count_tokens(prompt_format.user_turn(user, bot, prompt))
