"""The one state store: every RWKV state rpserver keeps on disk, one row each (StoredState).

A state is a pure function of its model and the exact tokens read from the
zero state, so it is stored once under (model fingerprint, SHA-256 of those
tokens) and shared by whoever needs it: the rounds of a chat and its forks,
the swipes of one reply, the OpenAI door's cache, the prompt states of
default characters. Holders *pin* a row's blob: a chat round by naming the
blob in its `pre_state`/`post_state` (chat registers that check here,
`pin_holders`: statecache does not import chat), the shared cache by the
row's `cached` flag. A row nobody holds is deleted, its blob with it.

The rules, each against a race:

- A blob is written (statecache.blobs, under a fresh random name) before
  the transaction that records it (`put_state`); a crash in between leaves
  an unreferenced file for the orphans sweep, never a row naming a
  half-written blob.
- `put_state` locks the key's row (select_for_update) and `release` locks
  the rows it may delete: a state being pinned by one transaction is never
  deleted by another's release (on SQLite, writes are serialised anyway).
- Two writers of one key: the first row wins; the second writer pins the
  first's blob and its own blob is deleted after its commit.

Everything here runs on Django's ORM thread.
"""

from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.db.models import Sum
from django.utils import timezone

from .models import StoredState

# Callables name -> bool: whether something outside statecache pins blob `name` (chat's rounds).
pin_holders = []


def is_pinned(name):
    return any(holder(name) for holder in pin_holders)


def put_state(model, digest, tokens, nbytes, name, cached=False):
    """Inside the caller's transaction: blob `name` (just written) as the state after the
    `tokens`-token prefix with SHA-256 `digest`. Returns the blob name the caller pins: `name`,
    or the blob the store already has for that key (then `name` is deleted once this commits).
    `cached`: the shared cache holds the row too."""
    now = timezone.now()
    with transaction.atomic():
        row = StoredState.objects.select_for_update().filter(digest=digest, state_model=model).first()
        if row is None:
            try:
                with transaction.atomic():  # a savepoint: another process may store the same key meanwhile
                    StoredState.objects.create(digest=digest, state_model=model, tokens=tokens, nbytes=nbytes,
                                               state=name, cached=cached, last_used=now)
                return name
            except IntegrityError:  # it did (and committed): share its blob, as below
                row = StoredState.objects.select_for_update().get(digest=digest, state_model=model)
        StoredState.objects.filter(pk=row.pk).update(last_used=now, cached=row.cached or cached)
    if row.state.name != name:
        transaction.on_commit(lambda: default_storage.delete(name))
    return row.state.name


def find_states(model, digests):
    """{digest: (row pk, blob name)} of the stored states among `digests` for `model`."""
    rows = StoredState.objects.filter(state_model=model, digest__in=list(digests))
    return {digest: (pk, name) for pk, digest, name in rows.values_list("pk", "digest", "state")}


def touch(pk):
    StoredState.objects.filter(pk=pk).update(last_used=timezone.now())


def forget(name):
    """The blob `name` is missing or unreadable: its row goes (and the file with it), so that the
    next writer of its key stores a good one. The pins that name it find nothing and rebuild."""
    with transaction.atomic():
        for row in StoredState.objects.select_for_update().filter(state=name):
            row.delete()  # its blob goes once this commits (rpserver.files)


def release(name):
    """A holder let go of blob `name` (after its transaction committed): the row and its blob go
    if nothing holds them any more. A blob with no row (written before the store was one) goes
    when nothing pins it."""
    if not name:
        return
    with transaction.atomic():
        rows = list(StoredState.objects.select_for_update().filter(state=name))
        if is_pinned(name):
            return
        if not rows:
            default_storage.delete(name)
        for row in rows:
            if not row.cached:
                row.delete()  # its blob goes once this commits


def put_cached(model, digest, tokens, nbytes, name):
    """The shared cache keeps a state it spilled from RAM; False if the store had it already (the
    cache holds that row now, and `name` is deleted once this commits)."""
    with transaction.atomic():
        return put_state(model, digest, tokens, nbytes, name, cached=True) == name


def prune_cached(budget):
    """The cache lets go of its least recently used rows until the rows it holds fit `budget` bytes;
    a row a round still pins stays for the round."""
    cached = StoredState.objects.filter(cached=True)
    total = cached.aggregate(total=Sum("nbytes"))["total"] or 0
    if total <= budget:
        return
    with transaction.atomic():
        for row in cached.select_for_update().order_by("last_used"):
            if total <= budget:
                break
            total -= row.nbytes
            if is_pinned(row.state.name):
                StoredState.objects.filter(pk=row.pk).update(cached=False)
            else:
                row.delete()  # its blob goes once this commits


def pinned_bytes(names):
    """(count, bytes) of the stored states among blob `names`."""
    rows = StoredState.objects.filter(state__in=list(names))
    return rows.count(), rows.aggregate(total=Sum("nbytes"))["total"] or 0
