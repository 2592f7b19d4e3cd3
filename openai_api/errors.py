"""OpenAI's error shape: {"error": {"message", "type", "param", "code"}} with a real HTTP status."""

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
}


class OpenAIError(Exception):
    """A request the API answers with an error: a message for a person, the field it is about."""

    def __init__(self, message, param=None, status=400, code=None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code

    def body(self):
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}
