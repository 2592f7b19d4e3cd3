"""A reply's text rules (inference/replytext.py): where it ends, and what of it is shown."""

from inference.replytext import find_end, hold_back, shown_text, stop_strings, visible_text
from inference.tokenizer import world_tokenizer


def decoder_of(text):
    stream = world_tokenizer().stream()
    for token in world_tokenizer().encode(text):
        stream.push(token)
    return stream


def test_the_visible_reply_ends_at_the_first_blank_line():
    assert visible_text(decoder_of(" Hello there.\n\nfriend: more"), final=True) == "Hello there."


def test_held_back_text_is_only_a_possible_start_of_a_stop_string():
    assert hold_back("Hello\nUs", [b"\nUser:"]) == "Hello"
    assert hold_back("Hello\nUx", [b"\nUser:"]) == "Hello\nUx"
    assert hold_back("caf\u00e9", ["\u00e9t\u00e9".encode()]) == "caf"


def test_stop_strings_are_distinct_nonempty_utf8_in_order():
    assert stop_strings("User:") == (b"User:",)
    assert stop_strings(["é", "", "x", "é"]) == ("é".encode(), b"x")


def test_the_end_is_whichever_of_a_blank_line_and_a_stop_string_ends_first():
    # (text end, kept bytes, closed): a blank line closes the turn itself; a stop string needs "\n\n" after it.
    assert find_end(b"Hi.\n\nUser:", 6, [b"User:"]) == (3, 5, True)
    assert find_end(b"Hi User:\n\n", 7, [b"User:"]) == (3, 8, False)
    assert find_end(b"Hi there", 5, [b"User:"]) is None


def test_only_the_bytes_the_last_token_could_complete_are_searched():
    # "\n\n" lies wholly before the last token's 2 bytes: an earlier token's search found it already.
    assert find_end(b"a\n\nbcd", 2, []) is None
    assert find_end(b"a\n\nbcd", 4, []) == (1, 3, True)


def test_shown_text_cuts_an_ended_reply_and_holds_back_a_running_one():
    decoder = decoder_of(" Hello\nUs")
    assert shown_text(decoder, [b"\nUser:"]) == "Hello"  # running: "\nUs" may begin the stop string
    assert shown_text(decoder, [b"\nUser:"], final=True) == "Hello\nUs"
    assert shown_text(decoder, [b"\nUser:"], text_end=3) == "He"
