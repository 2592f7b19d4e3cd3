"""What the model reads: the role-play prompt format.

    [<system prompt>\n\n]<example dialogue, names substituted>\n\n<persona>\n\n
    [<the person's persona>\n\n][<post-history instructions>\n\n]
    <Bot>: <greeting>\n\n
    <User>: <prompt>\n\n<Bot>: <reply>\n\n ...

One space after each colon; lines stripped; a turn never contains a blank
line (the model reads a blank line as the end of a turn), blocks keep at
most one blank line in a row. Every round is read as two parts: the part
before the reply (ending with "<Bot>:"), then the reply (" <text>\n\n").
Round 0's first part is the character header, its reply the greeting.
"""

import re

TURN_END = "\n\n"
BLANK_RUNS = re.compile(r"\n{3,}")


def clean_turn(text):
    """One turn: lines stripped, blank lines dropped."""
    lines = (line.strip() for line in str(text).replace("\r", "\n").split("\n"))
    return "\n".join(line for line in lines if line)


def clean_block(text):
    """A block (persona, example dialogue): lines stripped, blank runs collapsed to one."""
    lines = (line.strip() for line in str(text).replace("\r", "\n").split("\n"))
    return BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()


def speaker_names(user_name, bot_name, use_qa):
    """The names the prompt uses for the two speakers."""
    return ("User", "Assistant") if use_qa else (clean_turn(user_name), clean_turn(bot_name))


def substitute(text, user, bot):
    return text.replace("{{user}}", user).replace("{{char}}", bot)


def character_header(user, bot, persona, example_message, user_persona="", system_prompt="", instructions=""):
    """Round 0's first part: a character card's system prompt, example dialogue, persona, the person's
    persona (personas/), the card's post-history instructions, and the greeter's name.

    The model reads forward and keeps what it read, so the card's two instructions are read once, here:
    the system prompt first, where a transformer front end puts the main prompt it replaces; the
    post-history instructions last, just before the first reply, rather than before every reply (which
    would grow the state by their length each round; docs/cards.md)."""
    texts = (system_prompt, example_message, persona, user_persona, instructions)
    blocks = [clean_block(substitute(text, user, bot)) for text in texts]
    return "".join(block + TURN_END for block in blocks if block) + f"{bot}:"


def user_turn(user, bot, prompt):
    """A round's first part: what the user says, then the character's name."""
    return f"{user}: {clean_turn(prompt)}{TURN_END}{bot}:"


def reply_part(reply):
    """A reply as the model reads it when it is given (greeting, overwritten reply)."""
    return f" {clean_turn(reply)}{TURN_END}"


# ---- the chat template (the OpenAI-compatible API) ---------------------------
#
# The same turn format, with the speakers named by the messages:
#
#     System: <system message>\n\n
#     User: <message>\n\n
#     Assistant: <message>\n\n
#     ...
#     Assistant:            <- the reply is generated here, up to its first blank line
#
# A message with a `name` is spoken by that name ("Mira: ..."), as role-play
# clients name the speakers. Each turn is encoded as two parts, "<Name>:" and
# " <text>\n\n", the way the role-play format reads a reply after "<Bot>:", so
# that a reply the model wrote, sent back as an assistant message, encodes to
# the same tokens it was stored under (see chat_turn_parts).

ROLE_SPEAKERS = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


def speaker_name(role, name=None):
    """Who speaks a message: its `name` (one line, no colon), else its role's name."""
    if name:
        cleaned = " ".join(clean_turn(name).replace(":", " ").split())
        if cleaned:
            return cleaned
    return ROLE_SPEAKERS[role]


def chat_turn_parts(speaker, text):
    """A chat turn as the two parts that are encoded separately: ("<Speaker>:", " <text>\\n\\n")."""
    return f"{speaker}:", reply_part(text)


def chat_text(turns, reply_speaker):
    """The whole chat prompt as text: the turns [(speaker, text)], then "<reply_speaker>:"."""
    return "".join("".join(chat_turn_parts(speaker, text)) for speaker, text in turns) + f"{reply_speaker}:"
