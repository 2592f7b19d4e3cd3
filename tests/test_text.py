"""The prompt format and the tokenizer's decoding."""

from inference import prompt
from inference.tokenizer import world_tokenizer


def test_turns_lose_blank_lines_and_blocks_keep_one():
    assert prompt.clean_turn("  a \n\n\n b  \r\n c ") == "a\nb\nc"
    assert prompt.clean_block(" p1 \n\n\n\n p2 \n q ") == "p1\n\np2\nq"


def test_the_header_substitutes_names_and_ends_with_the_speaker():
    header = prompt.character_header("Ann", "Bo", "{{char}} likes {{user}}.", "{{user}}: hi\n\n\n{{char}}: yo")
    assert header == "Ann: hi\n\nBo: yo\n\nBo likes Ann.\n\nBo:"
    assert prompt.character_header("Ann", "Bo", "Persona.", "") == "Persona.\n\nBo:"


def test_a_round_reads_the_user_turn_then_the_reply():
    assert prompt.user_turn("Ann", "Bo", " hello\n\nthere ") == "Ann: hello\nthere\n\nBo:"
    assert prompt.reply_part(" fine\n\n ") == " fine\n\n"


def test_use_qa_names_the_speakers_user_and_assistant():
    assert prompt.speaker_names("哥哥", "小雪", use_qa=True) == ("User", "Assistant")
    assert prompt.speaker_names("哥哥", "小雪", use_qa=False) == ("哥哥", "小雪")


def test_one_invalid_byte_becomes_one_replacement_character():
    tokenizer = world_tokenizer()
    tokens = tokenizer.encode("ab") + [t for t, piece in tokenizer.pieces.items() if piece == b"\xff"] + tokenizer.encode("cd")
    assert tokenizer.decode(tokens) == "ab\ufffdcd"


def test_the_stream_decoder_never_shows_half_a_character():
    tokenizer = world_tokenizer()
    single_bytes = {piece: t for t, piece in tokenizer.pieces.items() if len(piece) == 1}
    stream = tokenizer.stream()
    texts = [stream.push(single_bytes[bytes([b])]) for b in "你好".encode()]
    assert texts == ["", "", "你", "你", "你", "你好"]
    stream.push(single_bytes[b"\xe4"])
    assert stream.text == "你好" and stream.finish() == "你好\ufffd"


def test_the_chat_template_names_the_speakers_and_cleans_the_turns():
    turns = [("System", "Be kind.\n\n\nAlways."), (prompt.speaker_name("user", "Ann: the\nfirst"), " hi \n\n there "),
             (prompt.speaker_name("assistant"), "Hello.")]
    assert prompt.chat_text(turns, "Assistant") == (
        "System: Be kind.\nAlways.\n\nAnn the first: hi\nthere\n\nAssistant: Hello.\n\nAssistant:")
    assert prompt.speaker_name("developer") == "System" and prompt.speaker_name("user", "  ") == "User"


def test_a_reply_sent_back_as_a_message_encodes_to_the_tokens_it_was_stored_under():
    from openai_api.services import chat_prompt

    tokenizer = world_tokenizer()
    before, _ = chat_prompt([("User", "Hi there")], "Mira")
    reply = tokenizer.encode(prompt.reply_part("Well, hello!"))
    after, ends = chat_prompt([("User", "Hi there"), ("Mira", "Well, hello!")], "User")
    assert after[:ends[-1]] == before + reply
