from django.dispatch import Signal

# Sent (with `character`) inside the transaction that changes a character's
# prompt or deletes it, under the character's lock: whatever was computed from
# the old prompt (its conversation, cached states) must go.
character_changed = Signal()
