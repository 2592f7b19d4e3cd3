"""The process's one engine: loaded once, from the settings or the `serve` flags."""

import ctypes
import logging
import threading
from pathlib import Path

from django.conf import settings

from .backends import load_backend, parse_strategy
from .checkpoint import CheckpointError, write_demo_model
from .engine import Engine
from .threads import ThreadPolicy, serial_thread
from .tokenizer import world_tokenizer

logger = logging.getLogger(__name__)

DEMO_LAYERS = 2
DEMO_EMBD = 256

_engine = None
_lock = threading.Lock()


def demo_model_path():
    """The demo checkpoint, written (random weights, fixed seed) if it is missing."""
    path = Path(settings.RPSERVER["DEMO_MODEL"])
    if not path.exists():
        logger.info("writing the demo model to %s", path)
        write_demo_model(path, n_layer=DEMO_LAYERS, n_embd=DEMO_EMBD)
    return path


def release_freed_memory():
    """Hand the memory freed while loading (the checkpoint's float32 tensors, the quantising
    temporaries) back to the system: glibc keeps freed heap for reuse, and without this the
    server's resident memory stayed ~580 MB above what the model holds (12 x 768 int8: 1,057
    MB resident after loading, 475 after trimming). Elsewhere than glibc: nothing to do."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_engine(model=None, strategy=None, jit_on=True, cuda_on=False):
    """Load the model and make it the process's engine (replacing none: call once)."""
    global _engine
    config = settings.RPSERVER
    with _lock:
        if _engine is not None:
            return _engine
        threads = ThreadPolicy.for_machine(decode=config["THREADS"], wide=config["PREFILL_THREADS"],
                                           adapt=config["ADAPT_THREADS"])
        serial_thread()  # only the engine thread runs torch on several cores (see inference.threads)
        # A bad value's message names where it came from: the serve flag or the variable.
        model_source = "--model" if model else "RPSERVER_MODEL" if config["MODEL"] else "the demo model"
        strategy_source = "--strategy" if strategy else "RPSERVER_STRATEGY"
        model = model or config["MODEL"]
        strategy = strategy or config["STRATEGY"]
        try:
            parse_strategy(strategy)
        except ValueError as exc:
            raise ValueError(f"{strategy_source}: {exc}") from exc
        if not model:
            model = demo_model_path()
            logger.warning(
                "no --model given: serving the DEMO model %s, which has random weights. "
                "Its replies are noise. Pass --model /path/to/RWKV-checkpoint for real replies.",
                model,
            )
        try:
            backend = load_backend(model, strategy, jit_on=jit_on, cuda_on=cuda_on, backend=config["BACKEND"])
        except CheckpointError as exc:
            raise CheckpointError(f"{model_source}: {exc}") from exc
        release_freed_memory()
        logger.info("model loaded: %s (id %s)", backend.description, backend.model_id)
        _engine = Engine(
            backend, world_tokenizer(),
            prefill_chunk=config["PREFILL_CHUNK"], max_batch=config["MAX_BATCH"],
            thread_policy=threads,
        )
        _engine.start()
        return _engine


def get_engine():
    """The process's engine, loaded from the settings on first use."""
    return _engine or load_engine()


def loaded():
    """The process's engine if it is loaded, else None: for what reports on it without loading it."""
    return _engine
