"""A reply's text rules: where it ends, and what of it is shown while it runs.

A reply ends at its first blank line, or at the first of its stop strings
that it writes, whichever ends first. While it runs, the text shown stops
before a blank line, and a tail that may be the start of a stop string is
held back until the next tokens tell. The engine (inference/engine.py)
applies these rules to each reply's bytes as its tokens are sampled.
"""

TURN_END = b"\n\n"


def stop_strings(stop):
    """A request's `stop` (one string or several) as distinct, non-empty UTF-8 bytes, in order."""
    if isinstance(stop, str):
        stop = (stop,)
    return tuple(dict.fromkeys(s.encode("utf-8") for s in stop if s))


def find_end(raw, last_piece_length, stops):
    """(text end, kept bytes, closed) once the reply's bytes `raw` hold its end, else None.

    The end is the first blank line (kept; it closes the turn: `closed`) or
    stop string (kept; "\n\n" must still be read after it), whichever ends
    first. Only the bytes the last token (`last_piece_length` bytes) could
    have completed a match with are searched.
    """
    best = None
    for marker in (TURN_END, *stops):
        start = raw.find(marker, max(0, len(raw) - last_piece_length - len(marker) + 1))
        if start >= 0 and (best is None or start + len(marker) < best[1]):
            best = (start, start + len(marker), marker == TURN_END)
    return best


def shown_text(decoder, stops, text_end=None, final=False):
    """The visible reply so far: up to `text_end` in decoder.raw once the reply ended at a blank
    line or stop string; else up to its first blank line, and while it runs (not `final`)
    without a tail that may begin a stop string."""
    if text_end is not None:
        return bytes(decoder.raw[:text_end]).decode("utf-8", errors="replace").strip()
    text = visible_text(decoder, final=final)
    if not final and stops:
        text = hold_back(text, stops)
    return text


def visible_text(decoder, final):
    """The reply as shown: what comes before the first blank line, stripped."""
    text = decoder.finish() if final else decoder.text
    cut = text.find("\n\n")
    return (text if cut < 0 else text[:cut]).strip()


def hold_back(text, stops):
    """`text` without a tail that is the beginning of one of the stop strings (UTF-8 bytes)."""
    raw = text.encode("utf-8")
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(raw)), held, -1):
            if raw.endswith(stop[:size]):
                held = size
                break
    return raw[:len(raw) - held].decode("utf-8", errors="ignore").rstrip() if held else text
