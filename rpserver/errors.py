"""The errors a service raises for a request, and the messages more than one service gives.

Every service raises ApiError for a request it refuses; the answer's shape
(the legacy envelope, or OpenAI's error object under /v1/) is
rpserver.envelope's business, not the service's.
"""


class ApiError(Exception):
    """A request the caller got wrong (code 400) or may not make (code 403)."""

    def __init__(self, message, code=400):
        super().__init__(message)
        self.message = message
        self.code = code


# A character's changes (a reply, regenerating, saving or deleting it) wait for no one: a second
# one while the first runs is refused with this.
BUSY = "a reply is already being generated for this character, please wait for it to finish"
