"""OpenAI's error shape: {"error": {"message", "type", "param", "code"}} with a real HTTP status.

The shape itself is rpserver.envelope's (the pipeline answers its own errors
under /v1/ with it too); an OpenAIError adds the field it is about (`param`)
and OpenAI's `code` where one applies (e.g. "invalid_api_key").
"""

from rpserver.envelope import openai_error
from rpserver.errors import ApiError


class OpenAIError(ApiError):
    """A request the API answers with an error: a message for a person, the field it is about.

    An ApiError whose code is the HTTP status, so that the consumers' one error
    handler (rpserver.streams.ApiConsumer) answers it; `openai_code` is OpenAI's
    `code` where one applies."""

    def __init__(self, message, param=None, status=400, code=None):
        super().__init__(message, code=status)
        self.param = param
        self.status = status
        self.openai_code = code

    def body(self):
        return openai_error(self.message, self.status, self.param, self.openai_code)
