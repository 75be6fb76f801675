"""Pydantic v2 models of the OpenAI-compatible request and response bodies.

Requests ignore unknown fields (the OpenAI SDK merges `extra_body` into the body). Fields that would change
what the caller expects but that we do not implement are declared so that `api.chat` can reject them with a
400 naming the field; see `UNSUPPORTED_CHAT_FIELDS` there. Hosted-only fields that change nothing for a
self-hosted server (`store`, `metadata`, `service_tier`, `user`, `parallel_tool_calls` without tools) are
accepted and ignored.

Types are strict: a boolean must be a JSON boolean and an integer a JSON integer (`max_tokens: true` or
`stream: "yes"` is a 400 naming the field); a number field takes integers too. `null` in a field that has a
default means that default (OpenAI marks `stream`, `n`, `logprobs` and `echo` nullable).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

MAX_N = 16  # choices per request
MAX_STOP = 16  # stop strings per request
INT32_MAX = 2**31 - 1


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """Drop `null` values of fields that have a default (the default applies); required fields keep
        them (and fail validation, or are checked where they are used)."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


# ---- content parts -----------------------------------------------------------------------------------


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageURL(_Request):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted, no effect


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Request):
    """vLLM/SGLang extension; `fps` and `max_frames` are our own optional sampling overrides."""

    url: str
    fps: Annotated[float, Field(gt=0, le=60)] | None = None
    max_frames: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None


class VideoPart(_Request):
    type: Literal["video_url"]
    video_url: VideoURL


class UnsupportedPart(_Request):
    """Part types of OpenAI's schema that we reject with a 400 (audio, files, refusals)."""

    type: Literal["input_audio", "file", "refusal", "audio_url"]


ContentPart = Annotated[TextPart | ImagePart | VideoPart | UnsupportedPart, Field(discriminator="type")]


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # ignored
    tool_calls: list[Any] | None = None  # rejected when non-empty
    tool_call_id: str | None = None
    function_call: Any | None = None  # rejected


# ---- requests ----------------------------------------------------------------------------------------

NonNegInt = Annotated[int, Field(ge=0, le=INT32_MAX)]
PosInt = Annotated[int, Field(ge=1, le=INT32_MAX)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _SamplingFields(_Request):
    """Sampling fields shared by chat and legacy completions (OpenAI plus vLLM extras)."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: PosInt | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**64 - 1)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None
    # vLLM-compatible extras
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=2.0)] | None = None
    min_tokens: NonNegInt = 0
    ignore_eos: bool = False
    stop_token_ids: list[NonNegInt] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # hosted-only, accepted and ignored
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None


class ChatCompletionRequest(_SamplingFields):
    """Body of POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: PosInt | None = None
    # vLLM's chat-template extras (api.chat.TemplateOptions)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    # declared only to be rejected (or accepted when harmless), see api.chat
    tools: list[Any] | None = None
    tool_choice: Any | None = None
    functions: list[Any] | None = None
    function_call: Any | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    audio: Any | None = None
    modalities: list[str] | None = None
    prediction: Any | None = None
    reasoning_effort: Any | None = None
    web_search_options: Any | None = None


class CompletionRequest(_SamplingFields):
    """Body of POST /v1/completions (text prompt or token ids)."""

    # a string, token ids, or a batch of either (null: a clear 400); checked by api.chat.split_prompts
    prompt: str | list[Any] | None
    # 0: nothing is generated (with echo and logprobs: the prompt scored), as OpenAI's minimum allows
    max_tokens: NonNegInt | None = None
    echo: bool = False  # the prompt is prepended to each choice (with logprobs: the prompt's too)
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: str | None = None  # rejected when set
    best_of: Annotated[int, Field(ge=1)] | None = None  # rejected unless equal to n


class TokenizeRequest(_Request):
    """Body of POST /tokenize: either a text `prompt` or chat `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[NonNegInt]


# ---- responses ---------------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: list[TokenLogprobOut] | None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]
    stop_reason: str | int | None = None  # vLLM extension: the stop string or token id


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    """Stream delta; unset fields are left out (`{}` on the finish chunk; role only on the first chunk)."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs format."""

    text_offset: list[int]
    token_logprobs: list[float | None]  # None: the first prompt token of an echo (nothing predicts it)
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "infinitevl"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
