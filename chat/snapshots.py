"""State blobs: RWKV states stored as safetensors through Django's storage API.

A blob holds the state's tensors ("0", "1", ...) and metadata naming the
format and the model it belongs to; a state never loads into another model.
Blobs are written under fresh random names and only then referenced by a
row, in the transaction that drops the old reference: a crash mid-write
leaves an unreferenced partial file and the previous state valid.
"""

import json
import logging
import struct

from django.core.files.base import ContentFile
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

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


def write_state(field_file, backend, state):
    """Store `state` into a FileField under a fresh name (the row is not saved)."""
    field_file.save("state.safetensors", ContentFile(encode_state(backend, state)), save=False)


def read_state(field_file, backend):
    """The state a FileField points to, or None (missing, damaged, another model)."""
    if not field_file:
        return None
    try:
        with field_file.open("rb") as stored:
            blob = stored.read()
    except OSError as exc:
        logger.warning("state blob %s is missing: %s", field_file.name, exc)
        return None
    return decode_state(backend, blob)
