"""State blobs: RWKV states stored as safetensors through Django's storage API.

A blob holds the state's tensors ("0", "1", ...) and metadata naming the
format and the model it belongs to; a state never loads into another model.
Blobs are written under fresh random names and only then referenced by a
row, in the transaction that drops the old reference: a crash mid-write
leaves an unreferenced partial file and the previous state valid.

Blobs are encoded, written and read in worker threads (`blob_io`), beside
the one thread that runs the ORM: when many replies end at once, their
megabytes of state go to storage together instead of queueing in front of
every other request's database work. Nothing here touches the database.
"""

import concurrent.futures
import functools
import json
import logging
import struct
import uuid

from asgiref.sync import sync_to_async
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from inference.threads import serial_thread

logger = logging.getLogger(__name__)

FORMAT = "rpserver-state"
FORMAT_VERSION = "1"


def encode_state(backend, state):
    tensors = {str(i): t for i, t in enumerate(backend.state_tensors(state))}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": backend.model_id,
                "rwkv_version": str(backend.version)}
    return save_safetensors(tensors, metadata=metadata)


def blob_metadata(blob):
    (header_size,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + header_size]).get("__metadata__", {})


def decode_state(backend, blob):
    """The state in a blob, or None if it is unreadable or of another model."""
    try:
        metadata = blob_metadata(blob)
        if metadata.get("format") != FORMAT or metadata.get("model") != backend.model_id:
            return None
        tensors = load_safetensors(blob)
        return backend.state_from_tensors([tensors[str(i)] for i in range(len(tensors))])
    except Exception as exc:  # a damaged file must never take a conversation down
        logger.warning("ignoring an unreadable state blob: %s", exc)
        return None


def state_name(owner_id):
    """A fresh name for a state blob: a random id under the owner's id, never user text."""
    return f"states/{owner_id}/{uuid.uuid4().hex}.safetensors"


def save_state(owner_id, backend, state):
    """Store `state` in a new blob; returns its storage name."""
    return default_storage.save(state_name(owner_id), ContentFile(encode_state(backend, state)))


def load_state(name, backend):
    """The state stored under `name`, or None (no name, missing, damaged, another model)."""
    if not name:
        return None
    try:
        with default_storage.open(name, "rb") as stored:
            blob = stored.read()
    except OSError as exc:
        logger.warning("state blob %s is missing: %s", name, exc)
        return None
    return decode_state(backend, blob)


def delete_states(names):
    for name in names:
        default_storage.delete(name)


# Blob work runs on its own small pool (not the ORM's thread). Two threads:
# enough to overlap one blob's encoding with another's writing, few enough
# that a burst of replies ending together does not crowd the engine.
# (Measured at 16 users: 2 threads 310 tok/s, 1 thread 295, asyncio's default pool 292.)
# Their tensor work runs on one core: only the engine thread's may use more (see inference.threads).
_blob_threads = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="state-blobs",
                                                      initializer=serial_thread)
blob_io = functools.partial(sync_to_async, thread_sensitive=False, executor=_blob_threads)
