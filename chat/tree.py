"""The conversation tree as stored: rounds under rounds, one current path.

A round is one [user_msg, bot_msg] pair (chat.models.Round) and a node of
its conversation's tree. The current path runs from a round 0 (the header
and greeting; a conversation may have several, the greeting's
alternatives) down to the conversation's head; the legacy API's rounds and
`log_index` are that path. Rounds with the same parent are alternatives:
those with the same user text are the swipes of the character's reply,
those with different user texts the edits of the person's message.

Everything here runs on Django's ORM thread; nothing here reads the model.
"""

from django.conf import settings
from django.db import IntegrityError, transaction

from characters.cards import card_instructions
from characters.services import get_character
from inference import prompt as prompt_format
from inference.runtime import get_engine
from rpserver.errors import ApiError

from .models import Conversation, Round

NO_CHAT = "chat does not exist"
NO_ROUND = "round does not exist in this chat"


def speaker_names(character):
    persona = character.chat_persona  # personas/: who the person is in this chat, if they chose
    user_name = persona.name if persona is not None else character.user_name
    return prompt_format.speaker_names(user_name, character.name, character.use_qa)


def first_round(conversation, character, greeting=None):
    """A round 0: the character header, then the greeting (or `greeting`) as the character's reply."""
    user, bot = speaker_names(character)
    tokenizer = get_engine().tokenizer
    persona = character.chat_persona
    system_prompt, instructions = card_instructions(character.card)
    header = tokenizer.encode(prompt_format.character_header(
        user, bot, character.persona, character.example_message,
        user_persona=persona.description if persona is not None else "",
        system_prompt=system_prompt, instructions=instructions))
    greeting = prompt_format.substitute(character.greeting if greeting is None else greeting, user, bot)
    round_ = Round(conversation=conversation, index=0, user_text=None, bot_text=greeting.strip(),
                   reply_start=len(header))
    round_.set_tokens(header + tokenizer.encode(prompt_format.reply_part(greeting)))
    return round_


def open_conversation(owner, name):
    """The owner's main conversation with a character, created with round 0 if there is none."""
    return conversation_of(get_character(owner, name))


def conversation_of(character):
    """The character's main conversation (the legacy API's chat), created with round 0 if new."""
    conversation = Conversation.objects.filter(character=character, is_fork=False).first()
    if conversation is not None and conversation.head_id is not None:
        return conversation
    try:
        with transaction.atomic():
            conversation, _ = Conversation.objects.get_or_create(character=character, is_fork=False,
                                                                 defaults={"owner": character.owner})
            if conversation.head_id is None:
                start = first_round(conversation, character)
                start.save()
                conversation.head = start
                conversation.save(update_fields=["head"])
    except IntegrityError:  # another request created it meanwhile
        conversation = Conversation.objects.get(character=character, is_fork=False)
    return conversation


def latest_round(character):
    """(main conversation, its head) of a character, opened if new: one query (a join) when it exists."""
    conversation = Conversation.objects.filter(character=character, is_fork=False) \
        .select_related("head").first()
    if conversation is None or conversation.head is None:
        conversation = conversation_of(character)
        conversation = Conversation.objects.select_related("head").get(pk=conversation.pk)
    return conversation, conversation.head


def last_round_index(character):
    """The index of the last round on the main conversation's current path; 0 (its greeting) if it is
    not opened yet."""
    last = Conversation.objects.filter(character=character, is_fork=False).values_list("head__index", flat=True) \
        .first()
    return last or 0


def chat_of(owner, chat_id):
    """The owner's conversation `chat_id`; ApiError if there is none (another user's is none too)."""
    conversation = Conversation.objects.filter(pk=chat_id, owner=owner).select_related("character").first()
    if conversation is None or conversation.head_id is None:
        raise ApiError(NO_CHAT, 404)
    # Read here, on the database thread, as get_character does: the chat's async code uses them.
    conversation.character.chat_persona, conversation.character.chat_lorebooks
    return conversation


def path_of(conversation, head_id=None):
    """The current path (or the one ending at `head_id`): its rounds from round 0, in order. One query."""
    rounds = {round_.pk: round_ for round_ in Round.objects.filter(conversation_id=conversation.pk)}
    path, pk = [], conversation.head_id if head_id is None else head_id
    while pk is not None:
        path.append(rounds[pk])
        pk = rounds[pk].parent_id
    path.reverse()
    return path


def path_tokens(path):
    return [token for round_ in path for token in round_.token_list]


def chat_log(conversation):
    """[[user_msg, bot_msg], ...] as the UI shows it; round 0 is [None, greeting]."""
    return [[round_.user_text, round_.bot_text] for round_ in path_of(conversation)]


def load_chat(owner, name):
    return chat_log(open_conversation(owner, name))


def context(owner, name):
    """(token count, text) of everything the model has read on the main conversation's current path."""
    return context_of(open_conversation(owner, name))


def context_of(conversation):
    tokens = path_tokens(path_of(conversation))
    return len(tokens), get_engine().tokenizer.decode(tokens)


def round_in(conversation, round_id):
    """A live round of `conversation`; ApiError if there is none."""
    round_ = Round.objects.filter(pk=round_id, conversation_id=conversation.pk, deleted=False).first()
    if round_ is None:
        raise ApiError(NO_ROUND, 404)
    return round_


def siblings_of(round_):
    """The live alternatives of `round_` (itself included), oldest first."""
    siblings = Round.objects.filter(conversation_id=round_.conversation_id, parent_id=round_.parent_id,
                                    deleted=False)
    return list(siblings.order_by("pk"))


def end_of_branch(round_):
    """Where the path ends when it passes through `round_`: down its `chosen` children (live ones)."""
    seen = set()
    while round_.chosen_id is not None and round_.pk not in seen:
        seen.add(round_.pk)
        child = Round.objects.filter(pk=round_.chosen_id, deleted=False).first()
        if child is None:
            break
        round_ = child
    return round_


def tree_view(conversation):
    """The chat as the REST API shows it: the current path's messages, each with its alternatives.

    Each round gives the person's message (not round 0) and the character's.
    A character message's alternatives are the rounds under the same parent
    with the same user text; a person's, one round per distinct user text
    (the one the path went through last, else the newest).
    """
    path = path_of(conversation)
    rounds = list(Round.objects.filter(conversation_id=conversation.pk, deleted=False)
                  .values_list("pk", "parent_id", "user_text").order_by("pk"))
    messages = []
    for round_ in path:
        siblings = [(pk, text) for pk, parent, text in rounds if parent == round_.parent_id]
        if round_.user_text is not None:
            by_text = {}
            for pk, text in siblings:
                by_text[text] = pk
            by_text[round_.user_text] = round_.pk
            ids = list(by_text.values())
            messages.append({"round": round_.pk, "role": "user", "text": round_.user_text,
                             "alternatives": ids, "position": ids.index(round_.pk) + 1})
        swipes = [pk for pk, text in siblings if text == round_.user_text]
        messages.append({"round": round_.pk, "role": "character", "text": round_.bot_text,
                         "pending": not round_.has_reply, "alternatives": swipes,
                         "position": swipes.index(round_.pk) + 1})
    return {"id": conversation.pk, "character": conversation.character.name, "is_fork": conversation.is_fork,
            "forked_from": conversation.forked_from_id, "head": conversation.head_id,
            "can_undo": conversation.undo_round_id is not None, "messages": messages}


# ---- which states are kept ----------------------------------------------------------


def kept_states(conversation, head_id):
    """The state policy, "ends, forks and every K": {round pk: (keeps pre_state, keeps post_state)}
    for the live rounds of a conversation.

    - post-round states at every path end (a round without live children:
      switching to a branch reads no token), at every branch point (two or
      more children: a swipe or edit below it starts there), at the head,
      and every STATE_CHECKPOINT_EVERY rounds deep (K), so that a pruned
      state is rebuilt reading at most K rounds from its nearest kept
      ancestor;
    - pre-reply states at path ends, at the head, and at rounds that have
      alternatives (a swipe of their reply starts there);
    - never round 0's: the header and greeting's state lives in the shared
      state cache, keyed by its exact tokens.

    Then the owner's budget (chat.states.keep_within_budget) may let go of
    more, the least needed first.
    """
    rows = list(Round.objects.filter(conversation_id=conversation.pk, deleted=False)
                .values_list("pk", "parent_id", "index"))
    return state_policy(rows, head_id, conversation.owner.is_guest)


def state_policy(rows, head_id, guest=False):
    """kept_states for rows [(key, parent key, index)] that need not be stored yet (chat.transfer
    decides which states of an imported chat to keep before its rounds exist). Guests and
    registered users get the same policy; their budgets differ (chat.states.state_budget)."""
    every = settings.RPSERVER["STATE_CHECKPOINT_EVERY"]
    children = {}
    for pk, parent, _ in rows:
        children[parent] = children.get(parent, 0) + 1
    kept = {}
    for pk, parent, index in rows:
        if index == 0:
            kept[pk] = (False, False)
            continue
        leaf, branch = children.get(pk, 0) == 0, children.get(pk, 0) >= 2
        checkpoint = index % every == 0
        has_alternatives = children.get(parent, 0) >= 2
        kept[pk] = (leaf or pk == head_id or has_alternatives, leaf or branch or pk == head_id or checkpoint)
    return kept
