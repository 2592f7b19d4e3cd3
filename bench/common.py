"""The benchmarks' shared helpers, split by concern; this module gathers them
for the scripts that import everything from one place (bench/soak.py,
bench/openai.py). New code imports from the module of the concern:

    script.py    BenchError, run_script, install_sigterm_handler
    stats.py     median, percentile, fmt, table
    machine.py   how busy the CPUs are (machine_note, wait_for_quiet, CpuMeter), a process's memory
    text.py      filler text of a known token count, the real prompt format (inference/prompt.py)
    server.py    `manage.py serve` in a subprocess (Server), the cached models (ensure_model)
    client.py    the legacy API over HTTP (Client), gather_strict
    baseline.py  the rwkv package decoding one stream, in a process of its own
"""

from baseline import baseline_subprocess, run_baseline  # noqa: F401
from client import Client, StreamResult, check_envelope, gather_strict  # noqa: F401
from machine import CpuMeter, cpu_busy_elsewhere, machine_note, read_status, wait_for_quiet  # noqa: F401
from script import BenchError, install_sigterm_handler, run_script  # noqa: F401
from server import (  # noqa: F401
    ABUSE_LIMITS_OFF, BENCH_DIR, CACHE_DIR, MANAGE, PYTHON, ROOT, Server, ensure_model, free_port,
)
from stats import fmt, median, percentile, table  # noqa: F401
from text import count_tokens, filler_text, text_of_tokens, tokenizer, user_turn_tokens  # noqa: F401
