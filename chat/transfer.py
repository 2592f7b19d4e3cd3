"""Chats in and out: SillyTavern's chat file (JSONL), written from a chat's tree and read into one.

The file (docs/import-export.md): the first line is a header object
({"user_name", "character_name", "create_date", "chat_metadata"}), then one
object per message ({"name", "is_user", "is_system", "send_date", "mes",
"extra"}; a character's message also has "swipes", every alternative's
text, "swipe_id", the index of the one shown, and "swipe_info", one object
per swipe).

Export writes the chat's current path: the greeting (its alternatives as
swipes), then each round's person's message and the character's reply (the
reply's alternatives, the rounds beside it with the same message, as
swipes). Edits of a person's message have no place in the format and are
left out.

Import reads a file (hostile until checked: parse_chat_file checks it
whole before anything is stored) into a new chat of a character: each
message pair becomes a round, the swipes the reply's alternatives, the shown
swipes the current path. The model reads the current path's text once, in
one pass (read_path: the states the policy keeps are snapshots taken on the
way); the other alternatives are read when first used, as a card's
alternate greetings are.
"""

import dataclasses
import json

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from characters.cards import CardError, load_json_object
from characters.services import get_character
from inference import prompt as prompt_format
from inference.runtime import get_engine
from limits import services as limits
from rpserver.errors import ApiError
from statecache.blobs import blob_io, delete_states, save_state
from statecache.models import STORE_DIR
from statecache.services import state_bytes

from .lease import check_lease, commit_and_release, db, lock_character, run_locked
from .models import Conversation, Round
from .states import pin, prefix_ends, round_zero_state
from .tree import chat_of, first_round, path_of, speaker_names, state_policy, tree_view

# A message's alternatives: more than this many is not a chat a person made.
MAX_SWIPES = 100
# How many kept states one engine job snapshots at most: the import's states are written in batches
# of this many, so that a long chat's snapshots are not all held in memory at once.
SNAPSHOTS_PER_READ = 8


def limit(name):
    return settings.RPSERVER[name]


# ---- export ---------------------------------------------------------------------------


def st_date(moment):
    """A time as SillyTavern writes a chat's create_date: 2024-01-02@15h04m05s (local time)."""
    local = timezone.localtime(moment)
    return f"{local:%Y-%m-%d}@{local:%H}h{local:%M}m{local:%S}s"


def export_chat(owner, chat_id):
    """(bytes, file name) of chat `chat_id` as a SillyTavern chat file (JSONL, UTF-8)."""
    conversation = chat_of(owner, chat_id)
    lines = chat_lines(conversation)
    name = f"{conversation.character.name} - {st_date(conversation.created)}.jsonl"
    return "\n".join(json.dumps(line, ensure_ascii=False) for line in lines).encode() + b"\n", name


def chat_lines(conversation):
    """The chat file's objects: the header, then the current path's messages."""
    character = conversation.character
    user, _ = speaker_names(character)
    path = path_of(conversation)
    live = list(Round.objects.filter(conversation_id=conversation.pk, deleted=False).order_by("pk"))
    lines = [{"user_name": user, "character_name": character.name, "create_date": st_date(conversation.created),
              "chat_metadata": {}}]
    for round_ in path:
        if round_.user_text is not None:
            lines.append(message_line(user, True, round_.user_text, round_.created))
        if not round_.has_reply:
            continue  # a person's message not answered yet: the file's last line
        swipes = [sibling for sibling in live if sibling.parent_id == round_.parent_id
                  and sibling.user_text == round_.user_text and (sibling.has_reply or sibling.pk == round_.pk)]
        line = message_line(character.name, False, round_.bot_text, round_.created)
        line |= {"swipes": [swipe.bot_text for swipe in swipes],
                 "swipe_id": [swipe.pk for swipe in swipes].index(round_.pk),
                 "swipe_info": [{"send_date": swipe.created.isoformat(), "gen_started": None, "gen_finished": None,
                                 "extra": {}} for swipe in swipes]}
        lines.append(line)
    return lines


def message_line(name, is_user, text, sent):
    return {"name": name, "is_user": is_user, "is_system": False, "send_date": sent.isoformat(), "mes": text,
            "extra": {}}


# ---- reading a chat file -------------------------------------------------------------


@dataclasses.dataclass
class ImportedRound:
    """A round of an imported chat: the person's message (None: round 0, the greeting) and the
    reply's alternatives; `current` the one on the path. No reply yet: `replies` is empty."""

    user_text: str | None
    replies: list
    current: int = 0


def parse_chat_file(file):
    """The rounds [ImportedRound] of a chat file (bytes of SillyTavern's JSONL), checked whole;
    ApiError (400) saying what is wrong otherwise. Nothing here touches the database.

    Round 0 is the greeting: the file's first message when it is the character's (its swipes the
    greeting's alternatives), else None (the character's own greeting). Then each person's
    message and the character's reply after it make a round; two messages of the same side in a
    row are joined into one (a line break between them: the model reads a turn as one); a
    person's message at the end is a round with no reply yet. Hidden messages (is_system true)
    are left out.
    """
    if len(file) > limit("MAX_CHAT_FILE_BYTES"):
        raise ApiError(f"the chat file is too large: the limit is {limit('MAX_CHAT_FILE_BYTES') // 1024} KB")
    try:
        text = file.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ApiError("the chat file is not UTF-8 text (a SillyTavern chat is a .jsonl file)")
    lines = [(number, line) for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise ApiError("the chat file is empty")
    objects = [(number, chat_line(number, line)) for number, line in lines]
    if "mes" not in objects[0][1]:
        objects = objects[1:]  # the header: the names in it are not used (the chat is the character's)
    messages = [(number, message) for number, message in objects if message_of(number, message) is not None]
    if len(messages) > limit("MAX_CHAT_MESSAGES"):
        raise ApiError(f"the chat file holds too many messages: the limit is {limit('MAX_CHAT_MESSAGES')}")
    rounds = []
    for number, message in messages:
        is_user, texts, current = message_of(number, message)
        if is_user:
            if rounds and rounds[-1].user_text is not None and not rounds[-1].replies:
                rounds[-1].user_text += "\n" + texts[0]
                continue
            if not rounds:
                rounds.append(ImportedRound(None, []))  # round 0: the character's own greeting
            rounds.append(ImportedRound(texts[0], []))
        elif not rounds:
            rounds.append(ImportedRound(None, texts, current))
        elif not rounds[-1].replies and rounds[-1].user_text is not None:
            rounds[-1].replies, rounds[-1].current = texts, current
        else:
            last = rounds[-1]
            if not last.replies:  # the character's own greeting, then a message of the character's
                last.replies = texts[current:current + 1]
            else:
                last.replies[last.current] += "\n" + texts[current]
    if not rounds:
        raise ApiError("the chat file holds no messages")
    return rounds


def chat_line(number, line):
    """Line `number` of the chat file as a JSON object; ApiError otherwise."""
    try:
        return load_json_object(line.encode(), f"line {number} of the chat file", "a chat message")
    except CardError as exc:
        raise ApiError(exc.message)


def message_of(number, message):
    """(is_user, texts, current) of a message object; None for a hidden message (is_system) or a
    person's message with no text. ApiError naming the line when a field has the wrong type or size."""
    where = f"line {number} of the chat file"
    is_user, is_system = message.get("is_user", False), message.get("is_system", False)
    if not isinstance(is_user, bool) or not isinstance(is_system, (bool, type(None))):
        raise ApiError(f"{where}: is_user and is_system must be true or false")
    if is_system:
        return None
    mes = message.get("mes")
    if not isinstance(mes, str):
        raise ApiError(f"{where}: mes (the message's text) must be text")
    texts, current = [mes], 0
    swipes = message.get("swipes")
    if swipes is not None and not is_user:
        if not isinstance(swipes, list) or not all(isinstance(swipe, str) for swipe in swipes):
            raise ApiError(f"{where}: swipes must be a list of texts")
        if len(swipes) > MAX_SWIPES:
            raise ApiError(f"{where}: a message may have at most {MAX_SWIPES} swipes")
        swipe_id = message.get("swipe_id", 0)
        if swipes:
            if not isinstance(swipe_id, int) or isinstance(swipe_id, bool) or not 0 <= swipe_id < len(swipes):
                raise ApiError(f"{where}: swipe_id must be the index of one of its swipes (0 to {len(swipes) - 1})")
            texts, current = swipes, swipe_id
    longest = limit("MAX_PERSONA_CHARS")
    for text in texts:
        if len(text) > longest:
            raise ApiError(f"{where}: a message may be at most {longest} characters, this one has {len(text)}")
    if is_user and not prompt_format.clean_turn(mes):
        return None  # an empty message of the person's: nothing to read (a reply may be empty)
    return is_user, [text.strip() for text in texts], current


# ---- importing: one pass over the text ------------------------------------------------------


@dataclasses.dataclass
class Planned:
    """A round to be stored: the unsaved Round, its key in the plan and its parent's key."""

    round: Round
    key: int
    parent: int | None
    on_path: bool


def plan_rounds(character, rounds):
    """The Rounds an imported chat makes (unsaved, without a conversation): [Planned], the path's
    rounds in order, each with its alternatives beside it (in the file's order)."""
    tokenizer = get_engine().tokenizer
    user, bot = speaker_names(character)
    planned, parent = [], None
    for index, imported in enumerate(rounds):
        texts = imported.replies or [None]  # None: the character's own greeting, or no reply yet
        on_path_key = None
        alternatives = []
        for position, reply in enumerate(texts):
            if imported.user_text is None:
                round_ = first_round(None, character, greeting=reply)
            else:
                head = tokenizer.encode(prompt_format.user_turn(user, bot, imported.user_text))
                round_ = Round(index=index, user_text=imported.user_text.strip(), bot_text="", reply_start=len(head))
                reply_tokens = tokenizer.encode(prompt_format.reply_part(reply)) if reply is not None else []
                round_.bot_text = reply.strip() if reply is not None else ""
                round_.set_tokens(head + reply_tokens)
            item = Planned(round_, len(planned) + len(alternatives) + 1, parent, position == imported.current)
            alternatives.append(item)
            if item.on_path:
                on_path_key = item.key
        planned += alternatives  # in the file's order: the alternatives keep their positions
        parent = on_path_key
    return planned


def snapshot_points(path, kept):
    """[(token offset after round 0, path position, field)] of the states to keep on the path, and
    the number of tokens to read after round 0 (a reply not written yet leaves its last prompt
    token unread: the reply is generated by reading it, as for any message)."""
    points, offset = [], 0
    for position, item in enumerate(path[1:], 1):
        round_ = item.round
        keep_pre, keep_post = kept[item.key]
        if keep_pre or not round_.has_reply:
            points.append((offset + round_.reply_start - 1, position, "pre_state"))
        if not round_.has_reply:
            return points, offset + round_.reply_start - 1
        offset += len(round_.token_list)
        if keep_post:
            points.append((offset, position, "post_state"))
    return points, offset


async def read_path(owner_id, path, kept):
    """Read the path's text once (one pass) and write the states the policy keeps: {(path position,
    field): blob name}. On failure the blobs written so far are deleted."""
    engine = get_engine()
    points, total = snapshot_points(path, kept)
    tokens = [token for item in path[1:] for token in item.round.token_list][:total]
    state = await round_zero_state(path[0].round.token_list)
    blobs, read = {}, 0
    try:
        while read < total:
            batch = [point for point in points if point[0] > read][:SNAPSHOTS_PER_READ]
            upto = batch[-1][0] if len(batch) == SNAPSHOTS_PER_READ else total
            state, snapshots = await engine.read(state, tokens[read:upto],
                                                 snapshot_at={offset - read for offset, _, _ in batch})
            for offset, position, field in batch:
                snapshot = snapshots.get(offset - read, state if offset == upto else None)
                blobs[(position, field)] = await blob_io(save_state)(STORE_DIR, engine.backend, snapshot)
            read = upto
    except BaseException:
        await blob_io(delete_states)(list(blobs.values()))
        raise
    return blobs


def store_imported(lease, planned, blobs, model_id, make_main):
    """Inside the lock: the imported chat's conversation and rounds, in one transaction that
    releases the lock (store_chat)."""
    with transaction.atomic():
        check_lease(lease)
        chat_id = store_chat(lease.character, planned, blobs, model_id, make_main)
        commit_and_release(lease)
    return chat_id


def store_chat(character, planned, blobs, model_id, make_main):
    """Inside the caller's transaction, under the character's lock (or for a character that this
    transaction creates): the imported chat's conversation and rounds, its read states pinned in the
    state store. Returns the new chat's id.

    `make_main`: the chat becomes the character's main chat; the main chat it had stays as another
    chat of the character (unless it held nothing but its greeting: then it goes)."""
    path = [item for item in planned if item.on_path]
    by_key = {item.key: item for item in planned}
    tokens = [token for item in path for token in item.round.token_list]
    ends = prefix_ends([item.round for item in path])
    nbytes = state_bytes(get_engine().backend.zero_state())  # an RWKV state's size is the model's
    with transaction.atomic():
        for (position, field), name in blobs.items():  # into the state store, keyed by their tokens
            round_ = path[position].round
            length = ends[position - 1] + round_.reply_start - 1 if field == "pre_state" else ends[position]
            setattr(round_, field, pin(tokens, length, (name, nbytes), model_id))
            round_.state_model = model_id
        for item in planned:  # a reply's alternatives share the state before it
            if not item.on_path and item.parent is not None:
                sibling = next(other for other in path if other.parent == item.parent)
                if sibling.round.pre_state:
                    item.round.pre_state, item.round.state_model = sibling.round.pre_state.name, model_id
        if make_main:
            old = Conversation.objects.filter(character=character, is_fork=False).first()
            if old is not None and not old.rounds.filter(index__gt=0).exists():
                old.delete()
            elif old is not None:
                Conversation.objects.filter(pk=old.pk).update(is_fork=True)
        conversation = Conversation.objects.create(owner_id=character.owner_id, character=character,
                                                   is_fork=not make_main)
        for item in planned:
            item.round.conversation = conversation
            item.round.parent = by_key[item.parent].round if item.parent is not None else None
            item.round.save()
        for parent, child in zip(path, path[1:]):
            Round.objects.filter(pk=parent.round.pk).update(chosen=child.round)
        Conversation.objects.filter(pk=conversation.pk).update(head=path[-1].round)
    return conversation.pk


async def import_chat(owner, character_name, file, make_main=True):
    """Import a chat file (bytes of SillyTavern's JSONL) as a chat of the owner's character
    `character_name`; returns the chat as the REST API shows it (chat.tree.tree_view).

    The file is checked whole first (parse_chat_file): a bad file raises ApiError and stores
    nothing; an import counts as a reply for the owner's reply rate (limits). Then, under the
    character's lock (a reply meanwhile: BUSY), the model reads the
    current path's text once and the chat is stored in one transaction; with `make_main` it
    becomes the character's main chat (store_imported).
    """
    rounds = parse_chat_file(file)
    await db(limits.check_reply_rate)(owner)  # the model reads it: it counts as a reply
    chat_id = await import_rounds(owner, character_name, rounds, make_main)
    return await db(lambda: tree_view(chat_of(owner, chat_id)))()


async def import_rounds(owner, character_name, rounds, make_main=True):
    """import_chat for a file already read (parse_chat_file's rounds); returns the new chat's id."""
    character = await db(get_character)(owner, character_name)
    lease = await db(lock_character)(character, lambda: (None, None))

    async def work(lease):
        planned, blobs = await read_chat(owner, character, rounds)
        try:
            return await db(store_imported)(lease, planned, blobs, get_engine().model_id, make_main)
        except BaseException:
            await blob_io(delete_states)(list(blobs.values()))
            raise

    return await run_locked(lease, work)


async def read_chat(owner, character, rounds):
    """The model reads an imported chat's current path once: (its planned rounds, the states the
    policy keeps {(path position, field): blob name}). `character` need not be stored yet (an account
    import plans its new characters before storing them; its chat_persona is set). Nothing here
    writes to the database; on failure the blobs written so far are deleted."""
    planned = await db(plan_rounds)(character, rounds)
    path = [item for item in planned if item.on_path]
    rows = [(item.key, item.parent, item.round.index) for item in planned]
    kept = state_policy(rows, path[-1].key, owner.is_guest)
    return planned, await read_path(owner.pk, path, kept)
