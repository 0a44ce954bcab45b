"""The HTTP side of the Serve app: OpenAI's chat request (validated strictly), the
deployment's `user_config` and `args`, and errors in OpenAI's shape."""

import hashlib
from typing import Literal, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class _Strict(BaseModel):
    # Unknown fields are errors (a typo must not be silently ignored); no type coercion.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(_Strict):
    """The subset of OpenAI's chat completion request that a spot check needs."""

    messages: list[ChatMessage] = Field(min_length=1)
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, gt=0)
    max_completion_tokens: Optional[int] = Field(None, gt=0)  # OpenAI's newer name for max_tokens
    temperature: Optional[float] = Field(None, ge=0, le=2)  # OpenAI's range; 0 is greedy
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = None
    stream: Optional[bool] = None


class ReloadRequest(_Strict):
    """The deployment's `user_config`: which checkpoint to serve."""

    checkpoint: str
    iteration: Optional[int] = None


class ServeArgs(BaseModel):
    """The application builder's `args`: fixed for the application's lifetime (changing
    them restarts the replica)."""

    model_config = ConfigDict(extra="forbid")

    model_name: str
    max_tokens_limit: int
    default_max_tokens: int
    max_n: int
    dtype: str
    api_key_sha256: Optional[str] = None

    def digest(self) -> str:
        """Tells replicas of different args apart (a changed key restarts the replica)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Validate a raw request body; any problem becomes a 400 naming the field."""
    try:
        return ChatCompletionRequest.model_validate_json(body or b"")
    except ValidationError as err:
        first = err.errors()[0]
        # Drop the union-member tags pydantic adds to a location ("content.str").
        loc = [p for p in first["loc"] if not (isinstance(p, str) and (p in ("str", "int", "float", "bool") or "[" in p))]
        param = ".".join(str(part) for part in loc) or None
        if first["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON: {first['msg']}") from None
        if first["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {param}", param=param) from None
        where = f"{param}: " if param else ""
        raise APIError(400, f"{where}{first['msg']}", param=param) from None
