"""Facts about this server that the web client shows (which model, whether sign-up is open)."""

import functools
from pathlib import Path

from django.conf import settings

from inference import runtime
from inference.checkpoint import CheckpointError, fingerprint, load_weights


@functools.lru_cache(maxsize=4)
def _fingerprint_of(path, modified):
    try:
        return fingerprint(load_weights(path))
    except CheckpointError:
        return None


def serving_demo_model():
    """True when the loaded model is the random-weight demo checkpoint.

    Told by the weights, not the file name: the loaded model's fingerprint
    equals the demo file's. Serving the demo writes that file first, so a
    missing file means a real model.
    """
    engine = runtime._engine
    demo = Path(settings.RPSERVER["DEMO_MODEL"])
    if engine is None or not demo.is_file():
        return False
    return engine.backend.model_id == _fingerprint_of(str(demo), demo.stat().st_mtime_ns)


def signup_allowed():
    """RPSERVER_ALLOW_SIGNUP (on unless an operator turns it off)."""
    return bool(settings.RPSERVER.get("ALLOW_SIGNUP", True))


def client_config():
    engine = runtime._engine
    return {
        "demo_model": serving_demo_model(),
        "model": engine.backend.description if engine is not None else "",
        "allow_signup": signup_allowed(),
        "max_reply_tokens": settings.RPSERVER["MAX_REPLY_TOKENS"],
        "max_prompt_chars": settings.RPSERVER["MAX_PROMPT_CHARS"],
        "max_persona_chars": settings.RPSERVER["MAX_PERSONA_CHARS"],
        "max_avatar_bytes": settings.RPSERVER["MAX_AVATAR_BYTES"],
    }
