"""Checks on a completion or chat request's parameters, before any quota is counted or any byte reaches a backend.
Ranges follow OpenAI's API reference; a refusal names the parameter (`error.param`) and the accepted range."""
import json
import math

MAX_TOKENS = 131_072  # above any context we serve; a model's own context length is checked too when known
MAX_N = 128
MAX_STOP = 4
MAX_STOP_CHARS = 1000
ROLES = ("system", "developer", "user", "assistant", "tool", "function")


class InvalidParameter(Exception):
    def __init__(self, param: str, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.message, self.code = param, message, code


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body, name, low, high):
    if name not in body or body[name] is None:
        return
    value = body[name]
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not low <= value <= high):
        raise InvalidParameter(name, f"{name} must be a number from {low} to {high}; got {value!r}.")


def _integer(body, name, low, high):
    if name not in body or body[name] is None:
        return
    value = body[name]
    if not _is_int(value) or not low <= value <= high:
        raise InvalidParameter(name, f"{name} must be an integer from {low} to {high}; got {str(value)[:40]!r}.")


def _boolean(body, name):
    if name in body and body[name] is not None and not isinstance(body[name], bool):
        raise InvalidParameter(name, f"{name} must be true or false; got {str(body[name])[:40]!r}.")


def _prompt(body):
    prompt = body.get("prompt")
    ok = (isinstance(prompt, str)
          or (isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt)
                                                       or all(_is_int(t) for t in prompt)
                                                       or all(isinstance(p, list) and all(_is_int(t) for t in p)
                                                              for p in prompt))))
    if not ok:
        raise InvalidParameter("prompt", "prompt must be a string, a list of strings or a list of token ids.")


def _messages(body):
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidParameter("messages", "messages must be a non-empty list of {\"role\", \"content\"} objects.")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InvalidParameter("messages", f"messages[{index}] must be an object whose role is one of "
                                               f"{', '.join(ROLES)}.")
        content = message.get("content")
        if not (isinstance(content, (str, list)) or (content is None and message.get("role") == "assistant"
                                                     and message.get("tool_calls"))):
            raise InvalidParameter("messages", f"messages[{index}].content must be a string or a list of parts.")


def check_generation_parameters(endpoint: str, body: dict, *, context_length: int | None) -> None:
    """Raise InvalidParameter for the first parameter out of range or of the wrong type."""
    if endpoint == "completions":
        _prompt(body)
    else:
        _messages(body)
    limit = min(MAX_TOKENS, context_length) if context_length else MAX_TOKENS
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if context_length and _is_int(value) and context_length < value <= MAX_TOKENS:
            raise InvalidParameter(name, f"This model's maximum context length is {context_length} tokens, and "
                                         f"{name} asks for {value}; lower {name}.", code="context_length_exceeded")
        # 0 scores a prompt without generating (echo with logprobs), as the legacy completions API allowed.
        scoring = endpoint == "completions" and body.get("echo") is True and body.get("logprobs") is not None
        _integer(body, name, 0 if scoring else 1, limit)
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "frequency_penalty", -2, 2)
    _integer(body, "n", 1, MAX_N)
    _integer(body, "best_of", 1, MAX_N)
    _integer(body, "seed", -(2**63), 2**64 - 1)
    for name in ("stream", "echo"):
        _boolean(body, name)
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise InvalidParameter("stream_options", "stream_options must be an object, e.g. {\"include_usage\": true}.")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if (not isinstance(stops, list) or len(stops) > MAX_STOP
                or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
            raise InvalidParameter("stop", f"stop must be a string or a list of at most {MAX_STOP} non-empty strings.")
    if endpoint == "completions":
        _integer(body, "logprobs", 0, 5)
    else:
        _boolean(body, "logprobs")
        _integer(body, "top_logprobs", 0, 20)
        # As OpenAI and vLLM refuse it; 0 asks for nothing (a client sending every default).
        if body.get("top_logprobs") and body.get("logprobs") is not True:
            raise InvalidParameter("top_logprobs", "top_logprobs needs logprobs: true; set both, or leave "
                                                   "top_logprobs out.")
    if body.get("logit_bias") is not None and not isinstance(body["logit_bias"], dict):
        raise InvalidParameter("logit_bias", "logit_bias must be an object mapping token ids to numbers.")
    for name, value in body.items():  # anything else: NaN and Infinity are not JSON, and no backend wants them
        try:
            json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # half a UTF-16 pair ("\ud800"): valid JSON, not text anything can send on
            raise InvalidParameter(str(name), f"{name} contains an unpaired surrogate (such as \\ud800), which is "
                                              "not text; send valid UTF-8.") from None
        except (ValueError, RecursionError):
            raise InvalidParameter(str(name), f"{name} contains NaN or Infinity (or nests without bound); send "
                                              "finite JSON numbers.") from None


# Parameters our own engine (training.serve) does not implement: it would answer as if they had not been sent, and a
# caller asking for tool calls or JSON would take a free-text answer for what it asked. Each with the test of a
# value that asks for something (its default, or leaving it out, asks for nothing). vLLM implements them (tools with
# a tool-call parser, response_format with guided decoding): an upstream backend gets them untouched. (Log
# probabilities, echo, penalties, logit_bias and n our engine implements.)
ENGINE_UNSUPPORTED = (
    ("best_of", lambda v: v > 1),
    ("suffix", bool),
    ("tools", bool),
    ("functions", bool),  # the deprecated form of tools
    ("tool_choice", lambda v: v not in ("none", "auto")),  # "auto" without tools asks for nothing
    ("function_call", lambda v: v not in ("none", "auto")),
    ("response_format", lambda v: not (isinstance(v, dict) and v.get("type") == "text")),
    ("modalities", lambda v: v != ["text"]),
    ("audio", bool),
)


def check_engine_support(body: dict) -> None:
    """For a model served by our engine, after check_generation_parameters: raise InvalidParameter for the first
    parameter set to something the engine would silently ignore."""
    for name, asks in ENGINE_UNSUPPORTED:
        if body.get(name) is not None and asks(body[name]):
            raise InvalidParameter(name, f"{name}={json.dumps(body[name])[:60]} is not supported by this model's "
                                         f"engine; leave {name} out (or at its default).",
                                   code="unsupported_parameter")
    # A conversation carrying tool calls or non-text parts: the engine refuses it too, but only once the call counts.
    for index, message in enumerate(body.get("messages") or ()):
        content = message.get("content")
        if message.get("role") in ("tool", "function") or message.get("tool_calls") or message.get("function_call"):
            raise InvalidParameter("messages", f"messages[{index}] is part of a tool call, which this model's engine "
                                               "cannot answer; send system, developer, user and assistant text only.",
                                   code="unsupported_parameter")
        if isinstance(content, list) and not all(isinstance(part, dict) and part.get("type") == "text"
                                                 and isinstance(part.get("text"), str) for part in content):
            raise InvalidParameter("messages", f"messages[{index}].content has a part that is not text; this model "
                                               "takes text only ({\"type\": \"text\", \"text\": ...}).",
                                   code="unsupported_parameter")
