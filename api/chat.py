"""Translate chat and legacy-completion requests into engine requests, and engine deltas into responses.

Request side: model check, rejection of unsupported features, messages -> chat-template messages plus a
list of media references, bounded media loading (async), chat template and processor in a worker thread,
prompt-length and max_tokens checks, SamplingParams. Response side: collecting deltas into one response
(aborting the request when the client goes away) or framing them as OpenAI stream chunks.

Unsupported chat fields (400 "... is not supported"): tools, tool_choice other than "none", functions,
function_call, response_format other than {"type": "text"}, audio, modalities other than ["text"],
prediction, reasoning_effort, web_search_options; messages with role "tool"/"function" or with tool_calls;
content parts input_audio/file/refusal. Accepted and ignored: store, metadata, service_tier, user, name,
parallel_tool_calls (without tools), image_url.detail.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from api.errors import APIError, context_too_long, invalid_value, model_not_found, not_supported, over_limit
from api.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, ImagePart, VideoPart, VideoURL
from api.settings import ServerSettings
from model.positions import continuation_positions
from serving.types import GenerateRequest, SamplingParams


@dataclass
class PreparedPrompt:
    """A processed prompt: token ids (list of ints), positions [3, L] and optional vision inputs."""

    input_ids: list[int]
    positions: Any  # torch.Tensor [3, prompt_len] int64, built by the processor
    rope_delta: int
    mm: Any = None  # serving.types.MultiModalInputs | None
    num_images: int = 0
    num_videos: int = 0


@dataclass
class MediaRef:
    """One image or video referenced by a message, in prompt order."""

    kind: str  # "image" | "video"
    url: str
    param: str  # request path for error messages, e.g. "messages.0.content.1.image_url.url"
    fps: float | None = None
    max_frames: int | None = None


@dataclass
class TemplateInput:
    messages: list[dict[str, Any]]
    media: list[MediaRef] = field(default_factory=list)


@dataclass(frozen=True)
class TemplateOptions:
    """vLLM's chat-template request fields: open the assistant's turn after the messages
    (`add_generation_prompt`), or continue the final assistant message where its text ends
    (`continue_final_message`: assistant prefill), never both."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


# ---- checks --------------------------------------------------------------------------------------------


def check_model(model: str, settings: ServerSettings) -> None:
    """404 unless `model` names the served model (its served name or its path)."""
    if model not in (settings.served_model_name, settings.model_path):
        raise model_not_found(model)


def reject_unsupported_chat(req: ChatCompletionRequest) -> None:
    """400 for every field whose effect we do not implement (nothing that matters is silently ignored)."""
    if req.tools:
        raise not_supported("tools", "tool calling (`tools`)")
    if req.tool_choice not in (None, "none"):
        raise not_supported("tool_choice")
    if req.functions:
        raise not_supported("functions")
    if req.function_call not in (None, "none"):
        raise not_supported("function_call")
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise not_supported("response_format", 'response_format other than {"type": "text"}')
    if req.audio is not None:
        raise not_supported("audio", "audio output")
    if req.modalities is not None and list(req.modalities) != ["text"]:
        raise not_supported("modalities", 'modalities other than ["text"]')
    for name in ("prediction", "reasoning_effort", "web_search_options"):
        if getattr(req, name) is not None:
            raise not_supported(name)
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid_value("top_logprobs requires logprobs to be true", "top_logprobs")
    _check_stream_options(req)


def reject_unsupported_completion(req: CompletionRequest) -> None:
    if req.suffix:
        raise not_supported("suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise not_supported("best_of", "best_of different from n")
    _check_stream_options(req)


def _check_stream_options(req: ChatCompletionRequest | CompletionRequest) -> None:
    """stream_options only with stream true (as OpenAI and vLLM answer)."""
    if req.stream_options is not None and not req.stream:
        raise invalid_value("stream_options is only allowed when stream is true", "stream_options")


MAX_PROMPTS = 256  # prompts in one /v1/completions batch (each one engine request, n choices each)
_PROMPT_FORMS = "a string, a list of strings, a list of token ids, or a list of token-id lists"


def split_prompts(prompt: str | list[Any] | None) -> list[str | list[int]]:
    """The prompts of a completion request, as OpenAI's `prompt` field allows them: one string, a batch
    of strings, one list of token ids (non-negative ints), or a batch of such lists. Every prompt is
    checked here, before any of them is submitted."""
    if prompt is None:  # OpenAI's schema allows null (its models then start a new document): not here
        raise invalid_value(f"prompt is required: {_PROMPT_FORMS}", "prompt")
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise invalid_value("prompt must not be empty", "prompt")
    if all(isinstance(p, str) for p in prompt):
        batch: list[str | list[int]] = list(prompt)
    elif all(isinstance(p, list) for p in prompt):
        batch = []
        for i, ids in enumerate(prompt):
            if not ids:
                raise invalid_value("a token-id prompt must not be empty", f"prompt.{i}")
            batch.append(_token_ids(ids, f"prompt.{i}"))
    else:
        batch = [_token_ids(prompt, "prompt")]
    if len(batch) > MAX_PROMPTS:
        raise over_limit(f"at most {MAX_PROMPTS} prompts per request, got {len(batch)}", "prompt")
    return batch


def _token_ids(ids: list[Any], param: str) -> list[int]:
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < 2**31:
            raise invalid_value(f"prompt must be {_PROMPT_FORMS} (non-negative ints)", f"{param}.{i}")
    return ids


# ---- messages -> template ------------------------------------------------------------------------------


def _assistant_text(msg: ChatMessage, i: int) -> str:
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    texts = []
    for j, part in enumerate(msg.content):
        if part.type != "text":
            raise invalid_value("assistant messages may only contain text parts", f"messages.{i}.content.{j}")
        texts.append(part.text)
    return "".join(texts)


def _user_content(msg: ChatMessage, i: int, media: list[MediaRef]) -> str | list[dict[str, Any]]:
    if msg.content is None:
        raise invalid_value(f"messages.{i}.content is required for role {msg.role}", f"messages.{i}.content")
    if isinstance(msg.content, str):
        return msg.content
    items: list[dict[str, Any]] = []
    for j, part in enumerate(msg.content):
        where = f"messages.{i}.content.{j}"
        if isinstance(part, ImagePart):
            if msg.role != "user":
                raise invalid_value("images are only allowed in user messages", where)
            media.append(MediaRef("image", part.image_url.url, f"{where}.image_url.url"))
            items.append({"type": "image"})
        elif isinstance(part, VideoPart):
            if msg.role != "user":
                raise invalid_value("videos are only allowed in user messages", where)
            media.append(_video_ref(part.video_url, f"{where}.video_url.url"))
            items.append({"type": "video"})
        elif part.type == "text":
            items.append({"type": "text", "text": part.text})
        else:
            raise not_supported(f"{where}.type", f"content part type `{part.type}`")
    return items


def _video_ref(v: VideoURL, param: str) -> MediaRef:
    return MediaRef("video", v.url, param, fps=v.fps, max_frames=v.max_frames)


def to_template(messages: list[ChatMessage], options: TemplateOptions = TemplateOptions()) -> TemplateInput:
    """OpenAI messages -> the processor's chat-template messages (images/videos as placeholders, in order).
    A final assistant message is history (a new assistant turn follows, as OpenAI answers), unless
    `options.continue_final_message` continues it."""
    if options.continue_final_message and options.add_generation_prompt:
        raise invalid_value(
            "continue_final_message and add_generation_prompt cannot both be true "
            "(set add_generation_prompt to false to continue the final message)",
            "continue_final_message",
        )
    if options.continue_final_message and messages and messages[-1].role != "assistant":
        raise invalid_value(
            "continue_final_message needs the last message to be an assistant message",
            "continue_final_message",
        )
    out = TemplateInput(messages=[])
    for i, msg in enumerate(messages):
        if msg.role in ("tool", "function"):
            raise not_supported(f"messages.{i}.role", f"role `{msg.role}`")
        if msg.tool_calls or msg.function_call is not None:
            raise not_supported(f"messages.{i}.tool_calls", "tool calls in messages")
        role = "system" if msg.role == "developer" else msg.role
        if role == "assistant":
            content: str | list[dict[str, Any]] = _assistant_text(msg, i)
        else:
            content = _user_content(msg, i, out.media)
        out.messages.append({"role": role, "content": content})
    return out


# ---- media ---------------------------------------------------------------------------------------------


async def load_media(refs: list[MediaRef], settings: ServerSettings) -> tuple[list[Any], list[Any]]:
    """Fetch and decode every image and video (bounded by settings.media); returns (images, videos)."""
    from api import media  # imported lazily: it pulls in the decoders

    limits = settings.media
    num_images = sum(r.kind == "image" for r in refs)
    num_videos = len(refs) - num_images
    if num_images > limits.max_images_per_request:
        raise over_limit(
            f"too many images: {num_images} > {limits.max_images_per_request} per request", "messages"
        )
    if num_videos > limits.max_videos_per_request:
        raise over_limit(
            f"too many videos: {num_videos} > {limits.max_videos_per_request} per request", "messages"
        )
    tasks = []
    for ref in refs:
        if ref.kind == "image":
            tasks.append(media.fetch_image(ref.url, limits, param=ref.param))
        else:
            fps = ref.fps or limits.default_video_fps
            tasks.append(
                media.fetch_video(ref.url, limits, fps=fps, max_frames=ref.max_frames, param=ref.param)
            )
    try:
        loaded = await asyncio.gather(*tasks)
    except media.MediaError as e:  # over a media limit (413): the request's size; else the URL's value
        code = "request_too_large" if e.status_code == 413 else "invalid_value"
        raise APIError(e.message, e.status_code, param=e.param or None, code=code) from e
    images = [x for x, r in zip(loaded, refs, strict=True) if r.kind == "image"]
    videos = [x for x, r in zip(loaded, refs, strict=True) if r.kind == "video"]
    return images, videos


# ---- processor -----------------------------------------------------------------------------------------


def _as_int_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):  # [1, L] batch of one
        ids = ids[0]
    return [int(t) for t in ids]


def _prepared(processed: Any) -> PreparedPrompt:
    mm = getattr(processed, "mm", None)
    return PreparedPrompt(
        input_ids=_as_int_list(processed.input_ids),
        positions=processed.positions,
        rope_delta=int(processed.rope_delta),
        mm=mm,
        num_images=int(getattr(mm, "num_images", 0) or 0),
        num_videos=int(getattr(mm, "num_videos", 0) or 0),
    )


PIECE_CHARS = 1 << 18  # characters per piece when a long text's tokens are counted piecewise
PIECE_SLACK = 16  # tokens one cut between pieces may add or remove (a special token or word split in two)


def _may_exceed(text: str, max_tokens: int) -> bool:
    """False when `text` cannot hold more than `max_tokens` tokens: a token covers at least one byte
    (byte-level BPE), and the text has no more UTF-8 bytes than that."""
    if len(text) > max_tokens:  # at least one byte per character
        return True
    return 4 * len(text) > max_tokens and len(text.encode("utf-8", "surrogatepass")) > max_tokens


def check_text_len(tokenizer: Any, text: str, max_prompt_len: int, param: str) -> None:
    """400 for a text that certainly has more than `max_prompt_len` tokens, found before tokenizing it
    whole (that takes gigabytes for tens of megabytes of text). A text that may exceed the limit is
    counted in pieces of PIECE_CHARS characters (memory bounded by one piece), stopping once the count
    passes the limit by more than PIECE_SLACK per cut so far. A text that passes gets the exact check
    (`check_prompt_len`) after its full tokenization. Runs in a worker thread."""
    if not _may_exceed(text, max_prompt_len):
        return
    count = 0
    for cuts, start in enumerate(range(0, len(text), PIECE_CHARS)):
        count += len(tokenizer.encode(text[start : start + PIECE_CHARS], add_special_tokens=False))
        if count > max_prompt_len + PIECE_SLACK * cuts:
            raise over_limit(
                f"the prompt has at least {count - PIECE_SLACK * cuts} tokens, more than this server's "
                f"limit of {max_prompt_len}",
                param,
            )


def _process(
    processor: Any, text: str, media: tuple[list[Any], list[Any]], max_prompt_len: int | None, param: str
) -> PreparedPrompt:
    """A rendered prompt and its (images, videos) through the processor, unless `check_text_len` finds
    the text too long for `max_prompt_len` (None: no check). Runs in a worker thread."""
    if max_prompt_len is not None:
        check_text_len(processor.tokenizer, text, max_prompt_len, param)
    return _prepared(processor.process(text, *media))


# appended to a continued final message's text to find where the template puts its end (found by its
# position, not by the text, which may occur again in the markup after it: a "|" or "\n" prefill)
_FINAL_END = "\x00infinitevl-final-end\x00"


def render_chat(processor: Any, messages: list[dict[str, Any]], options: TemplateOptions) -> str:
    """The chat template's text of `messages`. Continuing the final assistant message renders it and
    cuts the text where its content ends (its end-of-turn marker and after are dropped); an empty one
    leaves the assistant's turn open, as the generation prompt does."""
    if not options.continue_final_message:
        return processor.apply_chat_template(messages, add_generation_prompt=options.add_generation_prompt)
    final = messages[-1]["content"]
    if not final:
        return processor.apply_chat_template(messages[:-1], add_generation_prompt=True)
    marked = [*messages[:-1], {**messages[-1], "content": final + _FINAL_END}]
    text = processor.apply_chat_template(marked, add_generation_prompt=False)
    end = text.rfind(_FINAL_END)
    if end < 0 or not text[:end].endswith(final):  # a template that rewrites the content (none of ours)
        raise invalid_value(
            "the chat template does not keep the final message's text", "continue_final_message"
        )
    return text[:end]


def _run_processor(
    processor: Any,
    tmpl: TemplateInput,
    media: tuple[list[Any], list[Any]],
    max_prompt_len: int,
    options: TemplateOptions,
) -> PreparedPrompt:
    text = render_chat(processor, tmpl.messages, options)
    return _process(processor, text, media, max_prompt_len, "messages")


async def prepare_chat(
    messages: list[ChatMessage],
    processor: Any,
    settings: ServerSettings,
    options: TemplateOptions = TemplateOptions(),
) -> PreparedPrompt:
    """Messages -> processed prompt: media fetched on the loop, template and processor in a thread; a
    template text certainly longer than settings.max_prompt_len tokens is refused before the processor."""
    tmpl = to_template(messages, options)
    media = await load_media(tmpl.media, settings) if tmpl.media else ([], [])
    try:
        args = (processor, tmpl, media, settings.max_prompt_len, options)
        return await asyncio.to_thread(_run_processor, *args)
    except (ValueError, TypeError) as e:
        raise invalid_value(f"could not process the prompt: {e}", "messages") from e


async def prepare_completion(
    prompt: str | list[int],
    processor: Any,
    vocab_size: int | None = None,
    param: str = "prompt",
    max_prompt_len: int | None = None,
) -> PreparedPrompt:
    """One text or token-id prompt (`split_prompts`) -> processed prompt (text only; positions are
    0..L-1 on all three axes). Token ids must lie in the vocabulary (0..vocab_size-1) when `vocab_size`
    is given; a text certainly longer than `max_prompt_len` tokens is refused before the processor
    (`check_text_len`); errors name `param`."""
    if isinstance(prompt, list):
        ids = [int(t) for t in prompt]
        if vocab_size is not None:
            for i, t in enumerate(ids):
                if t >= vocab_size:
                    raise invalid_value(
                        f"token id {t} is outside the vocabulary (0..{vocab_size - 1})", f"{param}.{i}"
                    )
        return PreparedPrompt(ids, continuation_positions(0, len(ids), 0), 0)
    if not prompt:
        raise invalid_value("prompt must not be empty", param)
    try:
        return await asyncio.to_thread(_process, processor, prompt, ([], []), max_prompt_len, param)
    except (ValueError, TypeError) as e:
        raise invalid_value(f"could not process the prompt: {e}", param) from e


# ---- sampling ------------------------------------------------------------------------------------------


COMPLETION_DEFAULT_MAX_TOKENS = 16  # /v1/completions without max_tokens: OpenAI's and vLLM's default


def _max_tokens(
    requested: int | None,
    prompt_len: int,
    settings: ServerSettings,
    param: str,
    default: int,
    prompt_param: str,
) -> int:
    """The request's token budget: an explicit value checked against the limits (0: score the prompt
    only, which may fill max_model_len), else `default` clipped to what max_model_len leaves and to
    --max-tokens-limit. A prompt that leaves no room is the prompt's error (`prompt_param`)."""
    left = None if settings.max_model_len is None else settings.max_model_len - prompt_len
    if left is not None and left < 0:
        raise context_too_long(
            f"the prompt ({prompt_len} tokens) is longer than max_model_len {settings.max_model_len}",
            prompt_param,
        )
    if left == 0 and requested != 0:
        raise context_too_long(
            f"the prompt ({prompt_len} tokens) leaves no room to generate within max_model_len "
            f"{settings.max_model_len}",
            prompt_param,
        )
    limit = getattr(settings, "max_tokens_limit", None)
    if requested is None:
        return min(x for x in (default, left, limit) if x is not None)
    if left is not None and requested > left:
        raise context_too_long(
            f"{param}={requested} is too large: prompt has {prompt_len} tokens and max_model_len is "
            f"{settings.max_model_len} ({left} tokens left)",
            param,
        )
    if limit is not None and requested > limit:
        raise over_limit(f"{param}={requested} exceeds this server's limit of {limit}", param)
    return requested


def check_prompt_len(prompt_len: int, settings: ServerSettings, param: str) -> None:
    if prompt_len > settings.max_prompt_len:
        raise over_limit(
            f"the prompt has {prompt_len} tokens, more than this server's limit of {settings.max_prompt_len}",
            param,
        )


def _logit_bias(raw: dict[str, float] | None, vocab_size: int | None) -> dict[int, float] | None:
    if not raw:
        return None
    out = {}
    for key, value in raw.items():
        try:
            out[int(key)] = float(value)
        except ValueError:
            raise invalid_value(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
    _check_token_ids(out, vocab_size, "logit_bias")
    return out


def _check_token_ids(ids: Iterable[int], vocab_size: int | None, param: str) -> None:
    """400 naming `param` for a token id outside 0..vocab_size-1 (when the vocabulary size is known)."""
    if vocab_size is None:
        return
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise invalid_value(f"{param}: token id {bad} is outside the vocabulary (0..{vocab_size - 1})", param)


def build_sampling(
    req: ChatCompletionRequest | CompletionRequest,
    prompt_len: int,
    settings: ServerSettings,
    vocab_size: Any,
    prompt_param: str | None = None,
) -> SamplingParams:
    """Request fields -> engine SamplingParams (validated; ValueError becomes a 400).

    Without max_tokens, chat gets settings.default_max_tokens and completions get 16
    (COMPLETION_DEFAULT_MAX_TOKENS, the default of OpenAI's legacy API and vLLM), both clipped to what
    max_model_len leaves and to settings.max_tokens_limit. A completion's max_tokens 0 (scoring: echo with logprobs) runs one token, which
    the response leaves out (api.responses.without_completion): the engine needs one step to prefill the
    prompt and score it. prompt_param names the prompt in errors (default "messages" or "prompt")."""
    if isinstance(req, ChatCompletionRequest):
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        default, prompt_param = settings.default_max_tokens, prompt_param or "messages"
    else:
        requested, param, logprobs = req.max_tokens, "max_tokens", req.logprobs
        default, prompt_param = COMPLETION_DEFAULT_MAX_TOKENS, prompt_param or "prompt"
    max_tokens = _max_tokens(requested, prompt_len, settings, param, default, prompt_param)
    if max_tokens == 0:
        if req.min_tokens:
            raise invalid_value("min_tokens must be between 0 and max_tokens", "min_tokens")
        max_tokens, logprobs = 1, None  # the one token is left out of the answer
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    vocab = vocab_size if isinstance(vocab_size, int) else None
    _check_token_ids(req.stop_token_ids or (), vocab, "stop_token_ids")
    params = SamplingParams(
        max_tokens=max_tokens,
        n=req.n,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=_top_k(req.top_k, vocab_size),
        min_p=req.min_p or 0.0,
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=_logit_bias(req.logit_bias, vocab),
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        stop=tuple(s for s in stop if s),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        include_stop_str_in_output=req.include_stop_str_in_output,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
    )
    try:
        params.validate(vocab)
    except ValueError as e:
        raise invalid_value(str(e), param_of(str(e))) from e
    return params


def _top_k(top_k: int | None, vocab_size: Any) -> int:
    """0 (disabled) for none, and for k >= the vocabulary, which keeps every token just the same."""
    if not top_k or (isinstance(vocab_size, int) and top_k >= vocab_size):
        return 0
    return top_k


_REQUEST_FIELDS = frozenset(ChatCompletionRequest.model_fields) | frozenset(CompletionRequest.model_fields)


def param_of(message: str) -> str | None:
    """The request field an engine or SamplingParams error message starts with ("n=5 exceeds ...",
    "max_tokens 40000 exceeds ...", "top_p must be ..."), else None."""
    first = message.split(" ", 1)[0].split("=", 1)[0]
    return first if first in _REQUEST_FIELDS else None


def make_generate_request(
    request_id: str, prompt: PreparedPrompt, sampling: SamplingParams, deadline: float | None = None
) -> GenerateRequest:
    """`deadline`: time.monotonic() seconds after which the engine aborts the request (None: never)."""
    return GenerateRequest(
        request_id=request_id,
        prompt_token_ids=prompt.input_ids,
        positions=prompt.positions,
        rope_delta=prompt.rope_delta,
        sampling=sampling,
        mm=prompt.mm,
        deadline=deadline,
    )


# ---- deadlines -----------------------------------------------------------------------------------------

TIMEOUT_HEADER = "x-request-timeout"
TIMEOUT_FIELD = "timeout"


def _timeout_value(raw: Any, param: str) -> float:
    """A positive finite number of seconds, from a JSON number or a header string; else a 400."""
    value: Any = raw
    if isinstance(raw, str):
        try:
            value = float(raw.strip())
        except ValueError:
            value = None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise invalid_value(f"{param} must be a positive number of seconds", param)
    return float(value)


def request_timeout(header: str | None, body_value: Any, settings: ServerSettings) -> float | None:
    """The request's time budget in seconds: the smallest of the `X-Request-Timeout` header, the body's
    `timeout` field and the server's --request-timeout, whichever are given (None: no deadline)."""
    given = []
    if header is not None:
        given.append(_timeout_value(header, "X-Request-Timeout"))
    if body_value is not None:
        given.append(_timeout_value(body_value, TIMEOUT_FIELD))
    if settings.request_timeout_s is not None:
        given.append(settings.request_timeout_s)
    return min(given) if given else None
