"""Generation engine: any Llama-architecture Hugging Face checkpoint (safetensors + tokenizer.json), a static
preallocated KV cache, and continuous batching — new requests are admitted between decode steps (their prompts
prefilled together, right-padded, within a budget of positions per step) and every active request advances one
token per step, whatever its length. Prefix caching: a prompt starting with tokens a slot still holds is prefilled
from there (see Engine._place).

    engine = Engine("runs/r1/export")
    request = engine.submit(engine.encode("def add(a, b):"), SamplingParams(max_tokens=32, temperature=0))
    engine.run_until_idle()            # or engine.start() for a background thread (the server does this)
    print(request.text, request.finish_reason)

Greedy decoding reproduces transformers' `generate` token for token; batched results equal unbatched ones
(tests/training/test_engine.py). The model's modules are reused as they are; only the cached forward lives
here, so training and serving share one implementation of every layer.
"""
import collections
import dataclasses
import json
import math
import queue
import sys
import threading
import time
import traceback
import typing
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from training.config import ConfigError
from training.export import load_exported
from training.files import read_json_object
from training.model import apply_rope, rms_norm


class EngineError(ValueError):
    """A request the engine cannot serve (too long, bad parameters: 400; the engine has failed or is full: 503,
    with `retry_after` seconds when retrying soon is the remedy)."""

    def __init__(self, message: str, code: str = "invalid_value", param: str | None = None, status: int = 400,
                 retry_after: int | None = None):
        super().__init__(message)
        self.code, self.param, self.status, self.retry_after = code, param, status, retry_after


MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs
MAX_LOGIT_BIAS = 1024  # token ids one request may bias
# A request whose prompt shares at least this many more tokens with one prefilled in the same step than with any slot
# is prefilled right after it, from a copy of those tokens (a second, shorter prefill instead of computing them twice).
DEFER_FOR_PREFIX = 16
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed takes


@dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None: the rest of the context, as vLLM does when a chat request sets no limit
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks), as vLLM's parameter of the same name
    # Log probabilities: None, none; n, each chosen token's own and the n likeliest alternatives (from the model's
    # distribution, before temperature and top-k/top-p). prompt_logprobs: the prompt's tokens' too (echo).
    logprobs: int | None = None
    prompt_logprobs: bool = False
    # OpenAI's logit adjustments, before greedy choice or sampling: a bias per token id (-100 to 100: from banning a
    # token to forcing it), and penalties on the tokens generated so far, `frequency_penalty` times each one's count
    # plus `presence_penalty` once for any (-2 to 2).
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or bool(self.presence_penalty) or bool(self.frequency_penalty)

    def validate(self) -> None:
        def bad(param, message):
            raise EngineError(message, param=param)
        # 0 only to score a prompt (echo with its log probabilities): no token is generated.
        least = 0 if self.prompt_logprobs else 1
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < least):
            bad("max_tokens", "max_tokens must be a positive integer (0 only with echo and logprobs).")
        if not 0 <= self.temperature <= 2:
            bad("temperature", "temperature must be between 0 and 2.")
        if not 0 < self.top_p <= 1:
            bad("top_p", "top_p must be in (0, 1].")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "top_k must be a non-negative integer.")
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s or len(s) > 100 for s in self.stop):
            bad("stop", "stop takes up to 4 non-empty strings of at most 100 characters.")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"logprobs must be an integer from 0 to {MAX_LOGPROBS}.")
        if self.seed is not None and (not isinstance(self.seed, int) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            bad("seed", f"seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}.")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -2 <= value <= 2:
                bad(name, f"{name} must be a number from -2 to 2.")
        if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 and not isinstance(b, bool)
                and isinstance(b, (int, float)) and -100 <= b <= 100 for t, b in self.logit_bias.items()):
            bad("logit_bias", f"logit_bias maps up to {MAX_LOGIT_BIAS} token ids to a bias from -100 to 100, "
                              'e.g. {"50256": -100}.')


class Delta(typing.NamedTuple):
    """What a streaming request's reader gets next: new text, and the tokens generated since the last delta with
    their log probabilities (empty unless asked). A token's entry may come a delta before its text does: text that
    could still turn into a stop sequence, or half a character, is held back."""
    text: str
    token_ids: list[int]
    logprobs: list


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False
    slot: int = -1
    created: float = field(default_factory=time.time)
    first_token_at: float | None = None
    # Increments for streaming; None marks the end.
    deltas: "queue.Queue[Delta | None]" = field(default_factory=queue.Queue)
    done: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None
    stream: bool = False  # deltas are wanted while generating (else text is decoded once, at the end)
    # Per output token (and per prompt token from the second, when asked): (its log probability, [(token id, log
    # probability) of the likeliest alternatives]).
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache, not the prefill
    _emitted: int = 0  # characters of `text` already sent as deltas
    _emitted_logprobs: int = 0  # entries of `logprobs` already sent
    # Set after each delta: one reader following several requests (the n choices of one call) waits on one event.
    wake: threading.Event | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def _put(self, delta: "Delta | None") -> None:
        self.deltas.put(delta)
        if self.wake is not None:
            self.wake.set()


# (projection shapes, dtype, threads) -> whether the blocks read faster at one row: see Engine.__init__.
_BLOCKS_FASTER: dict[tuple, bool] = {}


class Engine:
    def __init__(self, model_dir: str | Path, *, device: str = "auto", max_batch: int = 32,
                 max_seq_len: int | None = None, dtype: str = "auto", prefill_tokens: int | None = None,
                 decode: str = "auto", max_waiting: int | None = None, prefix_cache: bool = True):
        model_dir = Path(model_dir)
        if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device {device}: no CUDA device is available here (use cpu or auto)")
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, not {max_batch}")
        use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        self.device = torch.device(device if device.startswith("cuda") else "cuda" if use_cuda else "cpu")
        self.dtype = torch.bfloat16 if (dtype == "bfloat16" or (dtype == "auto" and use_cuda)) else torch.float32
        model, hf_config = load_exported(model_dir, device=self.device)
        self.model = model.to(self.dtype).eval()  # the RoPE tables (buffers) are in this dtype too
        self.config = model.config
        # dynamic: each decode step slices the cache to the longest row (eager; the CPU default). static: one
        # fixed-shape step per (batch, context) bucket. graphs: that step captured as CUDA graphs and replayed —
        # at small batch a GPU otherwise waits on the host launching ~35 kernels a layer. compiled (the CUDA
        # default): the step through torch.compile first (fused elementwise kernels, fewer graph nodes), then
        # captured likewise; on an H100 at batch 1 it decoded 1,284 tokens/s against graphs' 721 (124M shape,
        # tests/bench/generate.py; the step was then compiled whole, it now is region by region, not yet timed on a
        # GPU). On a CPU the compiled step runs as it is, without graphs.
        self.decode_mode = {"auto": "compiled" if use_cuda else "dynamic"}.get(decode, decode)
        if self.decode_mode not in ("dynamic", "static", "graphs", "compiled"):
            raise ConfigError(f"decode must be auto, dynamic, static, graphs or compiled, not {decode!r}")
        if self.decode_mode == "graphs" and not use_cuda:
            raise ConfigError("decode graphs needs a CUDA device; on a CPU use dynamic (the default there)")
        # A compiled step reads the weights as a GPU does: the blocks' few-rows branch is a guard on the batch, which
        # would compile every region again for batches above _Linear.FEW_ROWS.
        blocks = self.device.type == "cpu" and self.decode_mode != "compiled"
        self.layers = [_LayerWeights.of(block, transposed=blocks) for block in self.model.model.layers]
        self.lm_head = _Linear.of([self.model.lm_head.weight], [None], transposed=blocks)
        if blocks:
            # The blocks stay only where they read faster, which is not so on every CPU. Timed once per process and
            # model shape: engines of one model in one process read it alike, so their greedy tokens cannot differ
            # by the rounding of one layout against the other.
            shapes = (tuple(p.shape for p in self.model.parameters()), self.dtype, torch.get_num_threads())
            if shapes not in _BLOCKS_FASTER:
                _BLOCKS_FASTER[shapes] = self._blocks_are_faster()
            if not _BLOCKS_FASTER[shapes]:
                self._drop_blocks()
        self.model_dir = model_dir
        self.tokenizer, self.chat_template, self.special_tokens, self.eos_ids = _load_tokenizer(model_dir, hf_config)
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len or self.config.max_seq_len, self.config.max_seq_len)
        self._use_graphs = use_cuda and self.decode_mode in ("graphs", "compiled")
        self._key_positions = torch.arange(self.max_seq_len, device=self.device)
        self._set_step_regions(compiled=self.decode_mode == "compiled")
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._graph_inputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._graph_pool = None
        c = self.config
        # One row more than the batch: the fixed-shape step's padding rows write there, never into a live slot.
        self.scratch_slot = max_batch
        # One tensor per layer, not one for all: torch.compile turns an in-place write into a view of a bigger
        # input into a copy of that whole input (every layer's cache, twice, at every step). One position more than
        # the longest context, never read: the fixed-shape step's keys, a slice up to its context bucket, are then
        # never the whole cache, which torch.compile takes for a constant size, not the dynamic context.
        shape = (max_batch + 1, c.num_kv_heads, self.max_seq_len + 1, c.head_dim)
        self.cache_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_layers)]
        self.cache_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.num_layers)]
        self.lengths = [0] * max_batch
        self.active: dict[int, Request] = {}
        # Prefix caching: a slot's keys and values stay valid after its request ends, until the slot is given to
        # another. A new prompt starting with tokens some slot holds (a chat's history, a shared system prompt)
        # takes the free slot holding most of them, or copies them from the slot that holds more, and is prefilled
        # from there. held[slot] lists the tokens whose keys and values the slot holds, position by position.
        self.prefix_cache = prefix_cache
        self.held: list[list[int]] = [[] for _ in range(max_batch)]
        # Prompts admitted in one step are prefilled as one padded batch of at most this many positions: a
        # burst of requests gets its first tokens in groups, with decode steps for the others in between. On this
        # CPU 256 halved the median time to first token of 32 simultaneous requests against one prompt at a time
        # (tests/bench/generate.py); a GPU needs far more positions per matmul to be busy.
        self.prefill_tokens = prefill_tokens or (4096 if use_cuda else 256)
        self.waiting: "collections.deque[Request]" = collections.deque()  # append/popleft are thread-safe
        # At most this many requests wait for a slot (None: no bound); beyond it submit refuses with 503 rather than
        # queue work no client will wait for. The lock makes the check and the append one step for the HTTP threads,
        # and lets the engine's thread drop cancelled requests from the queue.
        self.max_waiting = max_waiting
        self._waiting_lock = threading.Lock()
        self.wake = threading.Event()
        self.stats = {"requests": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0, "completion_tokens": 0,
                      "steps": 0}
        self._thread: threading.Thread | None = None
        self._stop = False
        self.failure: str | None = None  # why the decode loop stopped, when a step raised
        self.on_failure = None  # called once after a failure (the server shuts down, so its supervisor restarts it)

    @property
    def few_row_layout(self) -> str:
        """How a CPU step of a few rows reads the weights: "blocks" (_Linear), or "weight" as a GPU does."""
        return "weight" if self.lm_head.blocks is None else "blocks"

    def _drop_blocks(self) -> None:
        """Every projection reads its weight alone from now on, and the blocks' memory is freed."""
        def plain(p: "_Linear") -> "_Linear":
            return dataclasses.replace(p, blocks=None)
        self.layers = [dataclasses.replace(w, qkv=plain(w.qkv), o=plain(w.o), gate_up=plain(w.gate_up),
                                           down=plain(w.down)) for w in self.layers]
        self.lm_head = plain(self.lm_head)

    def _blocks_are_faster(self, rounds: int = 7) -> bool:
        """One row through every projection of the model, as a decode step at batch 1 reads them, from the blocks
        and from the weights in turn (the best of a few rounds each: ~15 ms for the 'small' preset). The blocks won
        on an AMD EPYC (see _Linear); on an Intel Xeon whose cache held the whole model, the weights decoded 10%
        faster (389 against 353 tokens/s, median of 6 alternating runs)."""
        projections = [p for w in self.layers for p in (w.qkv, w.o, w.gate_up, w.down)] + [self.lm_head]
        rows = {p.weight.shape[1]: torch.randn(1, 1, p.weight.shape[1], dtype=self.dtype) for p in projections}
        best = {True: math.inf, False: math.inf}
        with torch.inference_mode():
            for _ in range(rounds):
                for blocks in (True, False):
                    started = time.perf_counter()
                    for p in projections:
                        x = rows[p.weight.shape[1]]
                        p(x) if blocks else F.linear(x, p.weight, p.bias)
                    best[blocks] = min(best[blocks], time.perf_counter() - started)
        return best[True] < 0.97 * best[False]  # a tie keeps the weights alone: half the memory

    # --- Tokens -----------------------------------------------------------------------------------------
    def encode(self, text: str, *, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """A prompt's token ids. By default with the special tokens the tokenizer's post-processor adds (the BOS of
        a Llama checkpoint), as transformers and vLLM encode a completions prompt; chat prompts already hold theirs."""
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:  # what tokenizers raises for text that is not valid Unicode (JSON allows "\ud800")
            raise EngineError(f"The {param} holds characters that are not valid Unicode (an unpaired surrogate such "
                              "as \\ud800); send valid UTF-8 text.", param=param) from None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens included (what a log probability is reported against)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt text of a conversation, rendered as transformers' apply_chat_template renders it."""
        from jinja2 import TemplateError

        if not self.chat_template:
            raise EngineError("This model has no chat template; use /v1/completions.", code="chat_unsupported")
        try:
            return self.chat_template.render(messages=[chat_message(m, i) for i, m in enumerate(messages)],
                                             add_generation_prompt=True, **self.special_tokens)
        except TemplateError as exc:  # raise_exception: the template refuses these messages (roles not alternating)
            raise EngineError(f"This model's chat template refused the messages: {exc}", param="messages") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:  # the template's own arithmetic
            raise EngineError(f"This model's chat template failed on these messages ({type(exc).__name__}: {exc}).",
                              param="messages") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # The rendered template already holds its special tokens (the BOS of a Llama template): add none, as
        # transformers' apply_chat_template does not.
        return self.encode(self.render_chat(messages), add_special_tokens=False, param="messages")

    # --- Requests ---------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, *, stream: bool = False,
               wake: threading.Event | None = None) -> Request:
        if self.failure:
            raise EngineError(f"The engine failed ({self.failure}) and is being restarted; retry shortly.",
                              code="engine_failed", status=503)
        params.validate()
        if params.logit_bias and max(params.logit_bias) >= self.config.vocab_size:
            raise EngineError(f"logit_bias names token {max(params.logit_bias)}; this model's token ids run from 0 to "
                              f"{self.config.vocab_size - 1}.", param="logit_bias")
        if not prompt_ids:
            raise EngineError("The prompt is empty.", param="prompt")
        # The prompt alone leaves no room (for one token, unless max_tokens 0 only scores it): no max_tokens would help.
        if len(prompt_ids) + (0 if params.max_tokens == 0 else 1) > self.max_seq_len:
            raise EngineError(f"This model's context is {self.max_seq_len} tokens and the prompt has "
                              f"{len(prompt_ids)}, leaving none to generate. Shorten the prompt.",
                              code="context_length_exceeded", param="prompt")
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=self.max_seq_len - len(prompt_ids))
        if len(prompt_ids) + params.max_tokens > self.max_seq_len:
            raise EngineError(f"This model's context is {self.max_seq_len} tokens; the prompt has {len(prompt_ids)} "
                              f"and max_tokens asks for {params.max_tokens} more. Shorten the prompt or lower "
                              "max_tokens.", code="context_length_exceeded", param="max_tokens")
        request = Request(prompt_ids=list(prompt_ids), params=params, stream=stream, wake=wake)
        if params.seed is not None:
            request.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        with self._waiting_lock:
            if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
                raise EngineError(f"The engine is at capacity ({len(self.active)} requests generating, "
                                  f"{len(self.waiting)} waiting); retry shortly.", code="engine_overloaded",
                                  status=503, retry_after=1)
            self.waiting.append(request)
        self.wake.set()
        return request

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self.wake.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop:
            if not self.active and not self.waiting:
                self.wake.wait(timeout=0.5)
                self.wake.clear()
                continue
            try:
                self.step()
            except Exception as exc:  # out of memory, a CUDA error: nothing here can be trusted to go on
                self._fail(exc)
                return

    def _fail(self, exc: Exception) -> None:
        """End every request with an error instead of leaving its caller waiting on a thread that is gone."""
        traceback.print_exc()
        self.failure = f"{type(exc).__name__}: {exc}"[:500]
        pending = list(self.active.values())
        while self.waiting:
            pending.append(self.waiting.popleft())
        self.active.clear()
        for request in pending:
            request.finish_reason = "error"
            request._put(None)
            request.done.set()
        if self.on_failure is not None:
            self.on_failure()

    def run_until_idle(self) -> None:
        while self.active or self.waiting:
            self.step()

    @torch.inference_mode()
    def step(self) -> None:
        """Admit what fits and prefill it as one batch, then one decode step for every active request."""
        self._drop_cancelled()
        admitted, followers = self._admit()
        if admitted:
            self._prefill(admitted)
        if followers:  # their prompts' starts were prefilled just now, in the slots they follow: copied from there
            for request, leader in followers:
                self._copy_prefix(leader, request.slot, request.cached_tokens)
            self._prefill([request for request, _ in followers])
        admitted += [request for request, _ in followers]
        if not self.active:
            return
        prefilled = {r.slot for r in admitted}  # their next token comes with the next step's decode
        requests = [r for s, r in self.active.items() if r.finish_reason is None and s not in prefilled]
        for request in requests:  # the token fed in this step: its keys and values go to the next position
            self.held[request.slot].append(request.output_ids[-1])
        if requests and self.decode_mode == "dynamic":
            tokens = torch.tensor([[r.output_ids[-1]] for r in requests], device=self.device)
            logits = self._forward(tokens, [r.slot for r in requests])
            self._advance(requests, logits)
        elif requests:
            logits = self._decode_fixed([r.output_ids[-1] for r in requests], [r.slot for r in requests])
            self._advance(requests, logits)
        self.stats["steps"] += 1

    def _prefill(self, requests: list[Request]) -> None:
        """Prefill the prompts' uncached rests as one right-padded batch and take each one's first token."""
        rests = [r.prompt_ids[r.cached_tokens:] for r in requests]
        longest = max(len(rest) for rest in rests)
        # Right-padded: under the causal mask no real position sees a pad; each row's length is then its own.
        tokens = torch.tensor([rest + [0] * (longest - len(rest)) for rest in rests], device=self.device)
        every = {row: None for row, r in enumerate(requests) if r.params.prompt_logprobs}
        logits = self._forward(tokens, [r.slot for r in requests], last=[len(rest) - 1 for rest in rests],
                               every=every)
        for row, full in every.items():  # position p's logits give token p + 1's probability
            request = requests[row]
            table = torch.log_softmax(full[:-1].float(), dim=-1)
            request.prompt_logprobs = _logprob_entries(table, request.prompt_ids[1:], request.params.logprobs)
        for request in requests:
            self.lengths[request.slot] = len(request.prompt_ids)
            self.held[request.slot] = list(request.prompt_ids)
        self._advance(requests, logits)

    def _copy_prefix(self, source: int, slot: int, positions: int) -> None:
        """The slot holds the source's first positions from now on (its own, cut there, when they are the same)."""
        if source != slot:
            for cache in self.cache_k + self.cache_v:
                cache[slot, :, :positions] = cache[source, :, :positions]
        self.lengths[slot] = positions
        self.held[slot] = self.held[source][:positions]

    def _admit(self) -> tuple[list[Request], list[tuple[Request, int]]]:
        """Waiting requests for free slots, as many as fit in the prefill budget (always at least one): those
        prefilled first, and those following one of them, (request, the slot it follows): a prompt sharing at least
        DEFER_FOR_PREFIX more tokens with one admitted before it in this step than any slot holds (another choice
        of the same call, a burst with one system prompt) is prefilled after it, from a copy of that start."""
        admitted: list[Request] = []
        followers: list[tuple[Request, int]] = []
        free = [s for s in range(self.max_batch) if s not in self.active]
        while self.waiting and free:
            request = self.waiting[0]
            slot, source, cached = self._place(request, free)
            leader = None
            if admitted and self.prefix_cache and not request.params.prompt_logprobs:
                shared, lead = max((_common_prefix(request.prompt_ids, r.prompt_ids, len(request.prompt_ids) - 1),
                                    r.slot) for r in admitted)
                if shared >= cached + DEFER_FOR_PREFIX:
                    leader, cached = lead, shared
            rest = len(request.prompt_ids) - cached
            everyone = admitted + [r for r, _ in followers]
            longest = max([rest] + [len(r.prompt_ids) - r.cached_tokens for r in everyone])
            # Padded to the longest rest, every row must still fit its slot's positions.
            furthest = max([cached] + [r.cached_tokens for r in everyone]) + longest
            if everyone and (longest * (len(everyone) + 1) > self.prefill_tokens or furthest > self.max_seq_len):
                break
            self.waiting.popleft()
            if request.cancelled:
                self._finish(request, "cancelled")
                continue
            free.remove(slot)
            request.slot, request.cached_tokens = slot, cached
            if leader is not None:  # copied once its leader is prefilled; until then the slot holds nothing
                self.lengths[slot], self.held[slot] = 0, []
                followers.append((request, leader))
            else:
                self._copy_prefix(source, slot, cached)
                admitted.append(request)
            self.active[slot] = request
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += len(request.prompt_ids)
            self.stats["cached_prompt_tokens"] += cached
        return admitted, followers

    def _place(self, request: Request, free: list[int]) -> tuple[int, int, int]:
        """(slot, source, cached): the free slot for this request, the slot whose first `cached` positions hold the
        start of its prompt (the same slot, or one to copy them from), and how many. At least one prompt token is
        left to prefill: its logits give the first new token."""
        if not self.prefix_cache:
            return free[0], free[0], 0
        prompt, limit = request.prompt_ids, len(request.prompt_ids) - 1
        # Those scoring their prompt need every position's logits: nothing reused, but a slot chosen as for others.
        held = [0 if request.params.prompt_logprobs else _common_prefix(prompt, tokens, limit) for tokens in self.held]
        # The free slot whose overwrite loses fewest held tokens: an empty one, or this conversation's own (all it
        # holds is this prompt's start), rather than another history sharing a BOS or a chat template's first
        # tokens; among those, the one holding most of this prompt.
        slot = min(free, key=lambda s: (len(self.held[s]) - held[s], -held[s]))
        source = max(range(self.max_batch), key=lambda s: held[s])
        if held[source] == held[slot]:  # no copy needed
            source = slot
        return slot, source, held[source]

    def _drop_cancelled(self) -> None:
        for slot, request in list(self.active.items()):
            if request.cancelled:
                self._finish(request, "cancelled")
        # Waiting ones too: a client that gave up must not hold a place in the bounded queue.
        with self._waiting_lock:
            gone = [r for r in self.waiting if r.cancelled]
            if gone:
                self.waiting = collections.deque(r for r in self.waiting if not r.cancelled)
        for request in gone:
            self._finish(request, "cancelled")

    def _advance(self, requests: list[Request], logits: torch.Tensor) -> None:
        next_ids = self._sample(requests, logits)
        now = time.time()
        entries = {}
        wanting = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        if wanting:  # one table for all who ask, cut to each one's number of alternatives
            table = torch.log_softmax(logits[wanting].float(), dim=-1)
            most = max(requests[i].params.logprobs for i in wanting)
            rows = _logprob_entries(table, [next_ids[i] for i in wanting], most)
            entries = {i: (logprob, top[:requests[i].params.logprobs]) for i, (logprob, top) in zip(wanting, rows)}
        for i, (request, token) in enumerate(zip(requests, next_ids)):
            if request.first_token_at is None:
                request.first_token_at = now
            if request.params.max_tokens == 0:  # a prompt scored (its log probabilities), nothing generated
                self._finish(request, "length")
                continue
            if token in self.eos_ids and not request.params.ignore_eos:
                self._finish(request, "stop")
                continue
            request.output_ids.append(token)
            if i in entries:
                request.logprobs.append(entries[i])
            self.stats["completion_tokens"] += 1
            if request.stream or request.params.stop:  # else one decode at the end is enough
                request.text = self.decode(request.output_ids)
                stop_at = _first_stop(request.text, request.params.stop)
                if stop_at is not None:
                    request.text = request.text[:stop_at]
                    self._finish(request, "stop")
                    continue
            if len(request.output_ids) >= request.params.max_tokens:
                self._finish(request, "length")
            elif request.stream:
                self._emit(request, final=False)

    def _emit(self, request: Request, *, final: bool) -> None:
        # Hold back what could still become a stop sequence, and a trailing partial UTF-8 character.
        text = request.text
        limit = len(text)
        if not final:
            hold = max((len(s) - 1 for s in request.params.stop), default=0)
            limit = max(request._emitted, len(text) - hold)
            if text.endswith("\ufffd"):
                limit = min(limit, len(text) - 1)
        sent = request._emitted_logprobs
        if limit > request._emitted or len(request.logprobs) > sent:
            request._put(Delta(text[request._emitted:limit], request.output_ids[sent:len(request.logprobs)],
                               request.logprobs[sent:]))
            request._emitted, request._emitted_logprobs = max(limit, request._emitted), len(request.logprobs)

    def _finish(self, request: Request, reason: str) -> None:
        if reason != "stop" or not request.params.stop:  # a stop sequence already cut the text
            request.text = self.decode(request.output_ids)
        request.finish_reason = reason
        if request.slot in self.active and self.active[request.slot] is request:
            del self.active[request.slot]
        if reason != "cancelled":
            self._emit(request, final=True)
        request._put(None)
        request.done.set()

    def _sample(self, requests: list[Request], logits: torch.Tensor) -> list[int]:
        adjusting = [i for i, r in enumerate(requests) if r.params.adjusts_logits]
        if adjusting:  # on a copy: log probabilities are the model's own distribution
            logits = logits.to(torch.float32, copy=True)
            for i in adjusting:
                self._adjust(requests[i], logits[i])
        out = logits.argmax(dim=-1).tolist()  # greedy for all in one op; sampled rows are replaced below
        for i, request in enumerate(requests):
            p = request.params
            if p.temperature == 0:
                continue
            row = logits[i].float()
            row = row / p.temperature
            if p.top_k:
                kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
                row = row.masked_fill(row < kth, -math.inf)
            probs = torch.softmax(row, dim=-1)
            if p.top_p < 1:
                sorted_probs, order = torch.sort(probs, descending=True)
                cumulative = torch.cumsum(sorted_probs, dim=-1)
                drop = cumulative - sorted_probs > p.top_p  # keep the smallest set reaching top_p
                sorted_probs = sorted_probs.masked_fill(drop, 0.0)
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            out[i] = int(torch.multinomial(probs, 1, generator=request.generator))
        return out

    def _adjust(self, request: Request, row: torch.Tensor) -> None:
        """OpenAI's logit bias and penalties, in place on one row of float32 logits."""
        p = request.params
        if request.output_ids and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(request.output_ids, device=row.device), minlength=row.numel())
            row -= counts.to(row.dtype) * p.frequency_penalty + (counts > 0).to(row.dtype) * p.presence_penalty
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=row.device)
            row.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), dtype=row.dtype, device=row.device))

    # --- The cached forward -----------------------------------------------------------------------------
    def _forward(self, tokens: torch.Tensor, slots: list[int], last: list[int] | None = None,
                 every: dict[int, torch.Tensor | None] | None = None) -> torch.Tensor:
        """Logits of each row's last position (or of position `last[i]` of row i, for right-padded prompts);
        writes the rows' keys and values into their slots. For each row in `every`, the logits of all its positions
        up to `last` go into every[row] too."""
        model, c = self.model, self.config
        batch, seq = tokens.shape
        lengths = [self.lengths[s] for s in slots]
        total = max(lengths) + seq
        same_length = min(lengths) == max(lengths)
        contiguous = slots == list(range(slots[0], slots[0] + batch))
        # Decoding rows in scattered slots (requests that came and went): attend over the block of slots from the
        # first to the last, a view of the cache, each row's query placed at its slot. Gathering the rows' keys and
        # values instead copied every row's whole cache at every layer: two thirds of a step at 32 rows of a few
        # hundred positions. Free slots in the block cost a little attention each, hence only when they are few.
        low, width = min(slots), max(slots) + 1 - min(slots)
        span = seq == 1 and not contiguous and width <= 2 * batch
        if span:
            in_span = torch.tensor([s - low for s in slots], device=self.device)
        if not same_length or (seq > 1 and lengths[0]):  # what the rope tables or the mask must be indexed by
            positions = torch.tensor(lengths, device=self.device)[:, None] + torch.arange(seq, device=self.device)
        if same_length:  # slicing the tables is a view; no per-step tensors to build
            cos = model.rope_cos[lengths[0]:lengths[0] + seq][None, None]
            sin = model.rope_sin[lengths[0]:lengths[0] + seq][None, None]
        else:
            cos = model.rope_cos[positions][:, None]  # (batch, 1, seq, head_dim)
            sin = model.rope_sin[positions][:, None]
        # Key j is visible to the query at position p when j <= p (causal, and never past the row's length).
        # Rows of one length need no explicit mask: a fresh prompt is plain causal, a decode sees every key.
        causal = same_length and seq > 1 and lengths[0] == 0
        if same_length and (causal or seq == 1):
            mask = None
        elif span:  # per row of the block; a free slot's row sees position 0 only: a defined softmax, unused
            span_positions = torch.zeros(width, dtype=torch.long, device=self.device)
            span_positions[in_span] = positions[:, 0]
            mask = (torch.arange(total, device=self.device)[None, :] <= span_positions[:, None])[:, None, None]
        else:
            mask = (torch.arange(total, device=self.device)[None, None, :] <= positions[:, :, None])[:, None]
        if not (contiguous and same_length):
            slot_index = torch.tensor(slots, device=self.device)
        if not same_length:  # (row, head, position) of each new key: broadcast to (batch, heads, seq)
            heads = torch.arange(c.num_kv_heads, device=self.device)
            write_index = (slot_index[:, None, None], heads[None, :, None], positions[:, None, :])
        hidden = None if mask is None else ~mask  # keys a one-query row must not see
        x = model.model.embed_tokens(tokens)
        for layer, w in enumerate(self.layers):
            q, k, v = self._qkv(x, w, cos, sin)
            cache_k, cache_v = self.cache_k[layer], self.cache_v[layer]
            if contiguous and same_length:  # one block write for all rows
                first, start = slots[0], lengths[0]
                cache_k[first:first + batch, :, start:start + seq] = k
                cache_v[first:first + batch, :, start:start + seq] = v
            elif same_length:  # rows in scattered slots, all at one position (a prefill)
                start = lengths[0]
                cache_k[slot_index, :, start:start + seq] = k
                cache_v[slot_index, :, start:start + seq] = v
            else:  # rows each at its own length: a decode step, or prompts prefilled after their cached prefixes
                cache_k[write_index] = k
                cache_v[write_index] = v
            if contiguous:
                keys = cache_k[slots[0]:slots[0] + batch, :, :total]
                values = cache_v[slots[0]:slots[0] + batch, :, :total]
            elif span:
                keys, values = cache_k[low:low + width, :, :total], cache_v[low:low + width, :, :total]
                q = q.new_zeros((width, *q.shape[1:])).index_copy_(0, in_span, q)
            else:
                keys, values = cache_k[slot_index, :, :total], cache_v[slot_index, :, :total]
            groups = c.num_heads // c.num_kv_heads
            if seq == 1:
                # One query per row: two batched matmuls beat SDPA's general path on strided cache views (with a
                # mask too: rows at different lengths). Grouped-query heads share their key head as a group of
                # queries (heads h of one group are consecutive), so the cache is read in place, never repeated.
                rows = q.shape[0]
                q = q.reshape(rows, c.num_kv_heads, groups, c.head_dim)
                scores = torch.matmul(q, keys.transpose(-1, -2)) * (1.0 / math.sqrt(c.head_dim))
                if mask is not None:
                    scores = scores.masked_fill(hidden, float("-inf"))
                y = torch.matmul(torch.softmax(scores.float(), dim=-1).to(values.dtype), values)
                y = y.reshape(rows, c.num_heads, 1, c.head_dim)
            else:
                if groups > 1:
                    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal)
            if span:
                y = y.index_select(0, in_span)
            x = self._after_attention(x, y, w)
        for s in slots:
            self.lengths[s] += seq
        for row in every or ():
            every[row] = self.lm_head(model.model.norm(x[row, :last[row] + 1]))
        if last is None:
            ends = x[:, -1]
        else:
            ends = x[torch.arange(batch, device=self.device), torch.tensor(last, device=self.device)]
        return self.lm_head(model.model.norm(ends))

    # --- The fixed-shape decode step (CUDA graphs) ------------------------------------------------------------
    def warm_up(self) -> int:
        """Run every (batch, context) shape once now, before serving — captured as a CUDA graph, or compiled — so
        no request waits for a capture or a compilation (minutes for the compiled step). Returns how many shapes
        were prepared; 0 in the dynamic and static modes, which have nothing to prepare."""
        if self.decode_mode not in ("graphs", "compiled"):
            return 0
        batches = sorted({self._batch_bucket(n) for n in range(1, self.max_batch + 1)})
        contexts = sorted({self._bucket(n, 64, self.max_seq_len) for n in range(1, self.max_seq_len + 1)})
        prepared = 0
        for batch in batches:
            inputs = self._step_inputs(batch)
            inputs[1].fill_(self.scratch_slot)  # the step writes keys: into no live slot
            for context in contexts:
                with torch.inference_mode():
                    if self._use_graphs:
                        self._replay(batch, context)
                    else:
                        self._decode_step(*inputs, context)
                if self.decode_mode == "static":  # a capture failed: the engine decodes eagerly from now on
                    return prepared
                prepared += 1
        return prepared

    def _batch_bucket(self, n: int) -> int:
        """The fixed-shape step's rows for n requests. The compiled step has two at least: torch.compile takes a
        dimension of size 1 for a constant, and would compile every region again for batch 1 alone; a padding row
        adds next to nothing to a step whose time goes on reading the weights, as a GPU's does at batch 1."""
        return self._bucket(n, 2 if self.decode_mode == "compiled" else 1, self.max_batch)

    def _bucket(self, n: int, smallest: int, largest: int) -> int:
        size = smallest
        while size < n:
            size *= 2
        return min(size, largest)

    def _decode_fixed(self, tokens: list[int], slots: list[int]) -> torch.Tensor:
        """One decode step at a fixed (batch, context) shape: rows padded to a power-of-two batch (padding rows
        write only to the scratch slot), keys read up to a power-of-two context under a mask. Replayed from a
        CUDA graph in the graphs and compiled modes on a GPU, captured by warm_up or the first time a shape is seen."""
        n = len(tokens)
        batch = self._batch_bucket(n)
        context = self._bucket(max(self.lengths[s] for s in slots) + 1, 64, self.max_seq_len)
        token_in, slot_in, position_in = self._step_inputs(batch)
        pad = batch - n
        token_in.copy_(torch.tensor(tokens + [0] * pad), non_blocking=True)
        slot_in.copy_(torch.tensor(slots + [self.scratch_slot] * pad), non_blocking=True)
        position_in.copy_(torch.tensor([self.lengths[s] for s in slots] + [0] * pad), non_blocking=True)
        if self._use_graphs:
            logits = self._replay(batch, context)
        else:
            logits = self._decode_step(token_in, slot_in, position_in, context)
        for s in slots:
            self.lengths[s] += 1
        return logits[:n]

    def _step_inputs(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fixed-shape step's tokens, slots and positions for this batch bucket: the same tensors every time,
        since a captured graph reads its inputs from fixed addresses."""
        if batch not in self._graph_inputs:
            self._graph_inputs[batch] = tuple(torch.zeros(batch, dtype=torch.long, device=self.device)
                                              for _ in range(3))
        return self._graph_inputs[batch]

    def _set_step_regions(self, compiled: bool) -> None:
        """The fixed-shape step's three regions (_decode_start, _decode_layer, _decode_end), compiled or eager.
        Compiled region by region, not as one step: every layer runs the same compiled code with its own weights and
        cache as inputs, so a model's layers cost one layer's compilation; as one function, each layer was traced
        and compiled again (the 'small' preset's warm-up, 12 shapes on this CPU: 73 s against 288 s). Each region is
        compiled once for every (batch, context) bucket: those two dimensions are marked dynamic (_dynamic), every
        other size stays static. dynamic=True made every size and config integer symbolic instead, and sizes that
        happened to be equal (a batch of 2 and 2 key heads) were guarded equal, so the next batch compiled again:
        the 'small' preset's warm-up (batches up to 4, contexts up to 1,024), cold, took 76-83 s and 8 graphs that
        way, batch 1 included, and takes 25 s and 3 graphs now."""
        def region(function):
            return torch.compile(function, fullgraph=True) if compiled else function
        self._start, self._layer, self._end = region(self._decode_start), region(self._decode_layer), \
            region(self._decode_end)

    def _replay(self, batch: int, context: int) -> torch.Tensor:
        key = (batch, context)
        if key not in self._graphs:
            try:
                with torch.cuda.device(self.device):  # the engine's thread starts on device 0, whatever ours is
                    self._graphs[key] = self._capture(batch, context)
            except Exception as exc:  # a capture that fails must not take serving down: decode eagerly from now on
                print(f"engine: CUDA graph capture failed for batch {batch}, context {context} ({exc!r}); decoding "
                      "without graphs", file=sys.stderr, flush=True)
                self.decode_mode, self._use_graphs = "static", False
                self._set_step_regions(compiled=False)
                return self._decode_step(*self._graph_inputs[batch], context)
        graph, output = self._graphs[key]
        graph.replay()
        return output

    def _capture(self, batch: int, context: int) -> tuple:
        inputs = self._graph_inputs[batch]
        # Warm-up on a side stream, as capture requires; it writes the same keys and values at the same positions
        # as the replay that follows will, so running it on the live inputs changes nothing.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._decode_step(*inputs, context)  # compiles here in compiled mode
        torch.cuda.current_stream().wait_stream(stream)
        # One memory pool for every shape: graphs never run concurrently, and each output is consumed (sampled)
        # before the next replay, so reusing one another's scratch memory is safe.
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the HTTP threads of the server never touch CUDA, but must not fail a capture if they did.
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            output = self._decode_step(*inputs, context)
        return graph, output

    def _decode_step(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                     context: int) -> torch.Tensor:
        """Logits for one new token per row at `positions`, attending to keys [0, context) of each row's slot.
        Only tensor operations on fixed shapes: nothing here may read a value back to the host."""
        keys = self._key_positions[:context]  # the context as a tensor's size, a dimension the compiler keeps dynamic
        self._dynamic(tokens, positions, keys)
        x, cos, sin, visible = self._start(tokens, positions, keys)
        self._dynamic(cos, sin, slots)
        self._dynamic(visible, dims=(0, 3))
        for layer, w in enumerate(self.layers):
            self._dynamic(x)
            x = self._layer(x, w, self.cache_k[layer], self.cache_v[layer], cos, sin, visible, slots, positions)
        self._dynamic(x)
        return self._end(x)

    def _dynamic(self, *tensors: torch.Tensor, dims: tuple[int, ...] = (0,)) -> None:
        """Marks the tensors' `dims` (the batch; the context) dynamic for the compiled regions. "maybe": a model whose
        code made one of them a constant would compile once per bucket, not fail its capture (and decode without
        graphs); the test of the compiled step counts its graphs."""
        if self.decode_mode == "compiled":
            for tensor in tensors:
                torch._dynamo.maybe_mark_dynamic(tensor, dims)

    def _decode_start(self, tokens: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor):
        """The step's embeddings, its rows' RoPE factors and which of the context's keys (their positions) each row
        sees."""
        model = self.model
        cos = model.rope_cos[positions][:, None, None]  # (batch, 1, 1, head_dim)
        sin = model.rope_sin[positions][:, None, None]
        visible = (keys[None, :] <= positions[:, None])[:, None, None]
        return model.model.embed_tokens(tokens[:, None]), cos, sin, visible

    def _decode_layer(self, x: torch.Tensor, w: "_LayerWeights", cache_k: torch.Tensor, cache_v: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, visible: torch.Tensor, slots: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        """One layer of the step: its keys and values written to the cache, attention over the context's keys
        (visible's last dimension), then the MLP."""
        c = self.config
        batch, groups, context = x.shape[0], c.num_heads // c.num_kv_heads, visible.shape[-1]
        rows, heads = slots[:, None], torch.arange(c.num_kv_heads, device=x.device)[None, :]
        q, k, v = self._qkv(x, w, cos, sin)
        cache_k.index_put_((rows, heads, positions[:, None]), k[:, :, 0])
        cache_v.index_put_((rows, heads, positions[:, None]), v[:, :, 0])
        keys = cache_k[:, :, :context].index_select(0, slots)
        values = cache_v[:, :, :context].index_select(0, slots)
        q = q.reshape(batch, c.num_kv_heads, groups, c.head_dim)  # a group of query heads per key head
        scores = torch.matmul(q, keys.transpose(-1, -2)) * (1.0 / math.sqrt(c.head_dim))
        scores = scores.float().masked_fill(~visible, -math.inf)
        y = torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)
        return self._after_attention(x, y.reshape(batch, c.num_heads, 1, c.head_dim), w)

    def _decode_end(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.model.norm(x[:, 0]))

    # --- One layer's projections, shared by both decode steps --------------------------------------------------
    def _qkv(self, x: torch.Tensor, w: "_LayerWeights", cos: torch.Tensor, sin: torch.Tensor):
        """Queries, keys and values (batch, heads, seq, head_dim) of x (batch, seq, hidden), q and k rotated."""
        c = self.config
        batch, seq = x.shape[:2]
        qk, v = w.qkv(rms_norm(x, w.input_norm, c.rms_norm_eps)).split(w.qk_v_split, dim=-1)
        # q and k rotated together: one RoPE over all their heads.
        qk = apply_rope(qk.view(batch, seq, c.num_heads + c.num_kv_heads, c.head_dim).transpose(1, 2), cos, sin)
        v = v.view(batch, seq, c.num_kv_heads, c.head_dim).transpose(1, 2)
        return qk[:, :c.num_heads], qk[:, c.num_heads:], v

    def _after_attention(self, x: torch.Tensor, y: torch.Tensor, w: "_LayerWeights") -> torch.Tensor:
        """The output projection of the attention y (batch, heads, seq, head_dim), then the MLP, both residual."""
        c = self.config
        batch, seq = x.shape[:2]
        x = x + w.o(y.transpose(1, 2).reshape(batch, seq, c.num_heads * c.head_dim))
        gate, up = w.gate_up(rms_norm(x, w.post_norm, c.rms_norm_eps)).chunk(2, dim=-1)
        return x + w.down(F.silu(gate) * up)


@dataclass(frozen=True)
class _Linear:
    """A projection as the decode loop runs it: x @ weight.T + bias. On a CPU it also keeps weight.T, contiguous and
    cut into one block of columns per thread, for steps of a few rows: MKL's matrix-vector product runs on one
    thread, and reads weight.T faster than weight (the 'small' preset's 49 MB of weights on an AMD EPYC: 4.5 ms a
    token from weight, 3.0 from weight.T, 2.6 as two blocks in one batched product on two threads; summing the same
    bytes takes 1.8 ms). From about 8 rows the original layout is the faster one. The copy doubles those weights'
    memory, on CPUs only, and only where the engine found it faster (Engine._blocks_are_faster)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    blocks: torch.Tensor | None  # (threads, in, out / threads); None on a GPU

    FEW_ROWS = 4

    @classmethod
    def of(cls, weights: list[torch.Tensor], biases: list[torch.Tensor | None], *, transposed: bool) -> "_Linear":
        weight = (torch.cat(weights) if len(weights) > 1 else weights[0]).detach()
        bias = None if biases[0] is None else (torch.cat(biases) if len(biases) > 1 else biases[0]).detach()
        if not transposed:
            return cls(weight, bias, None)
        out_features, in_features = weight.shape
        parts = max(1, torch.get_num_threads())
        parts = parts if out_features % parts == 0 else 1
        blocks = weight.t().reshape(in_features, parts, out_features // parts).permute(1, 0, 2).contiguous()
        return cls(weight, bias, blocks)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks is None or x.numel() > self.FEW_ROWS * x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        out = torch.bmm(rows.expand(self.blocks.shape[0], *rows.shape), self.blocks)  # (threads, rows, block)
        out = out.transpose(0, 1).reshape(rows.shape[0], -1)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], out.shape[-1])


@dataclass(frozen=True)
class _LayerWeights:
    """One layer's weights as the decode loop uses them: q, k and v as one matrix, gate and up as one (fewer,
    wider matmuls; the model's own modules and state dict are untouched)."""

    input_norm: torch.Tensor
    qkv: _Linear
    qk_v_split: tuple[int, int]
    o: _Linear
    post_norm: torch.Tensor
    gate_up: _Linear
    down: _Linear

    @classmethod
    def of(cls, block, *, transposed: bool) -> "_LayerWeights":
        attn, mlp = block.self_attn, block.mlp

        def linear(*modules):
            return _Linear.of([m.weight for m in modules], [m.bias for m in modules], transposed=transposed)
        return cls(input_norm=block.input_layernorm.weight.detach(),
                   qkv=linear(attn.q_proj, attn.k_proj, attn.v_proj),
                   qk_v_split=(attn.q_proj.out_features + attn.k_proj.out_features, attn.v_proj.out_features),
                   o=linear(attn.o_proj), post_norm=block.post_attention_layernorm.weight.detach(),
                   gate_up=linear(mlp.gate_proj, mlp.up_proj), down=linear(mlp.down_proj))


def chat_message(message, index: int) -> dict:
    """One message as a chat template takes it: {role, content} with text content. OpenAI's newer forms are accepted
    as vLLM accepts them: content as a list of text parts (joined by newlines), and the developer role (OpenAI's new
    name for system). Tool calls and non-text parts this engine cannot answer: refused, naming what to send instead."""
    role = message.get("role") if isinstance(message, dict) else None
    if role not in ("system", "developer", "user", "assistant"):
        hint = " (this engine has no tool calling)" if role in ("tool", "function") else ""
        raise EngineError(f"messages[{index}].role must be system, developer, user or assistant; got "
                          f"{str(role)[:40]!r}{hint}.", param="messages")
    if message.get("tool_calls") or message.get("function_call"):
        raise EngineError(f"messages[{index}] holds tool calls, which this engine cannot answer; send text only.",
                          param="messages")
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                   for part in content):
            raise EngineError(f"messages[{index}].content parts must all be {{\"type\": \"text\", \"text\": ...}}: "
                              "this model takes text only.", param="messages")
        content = "\n".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise EngineError(f"messages[{index}].content must be a string or a list of text parts.", param="messages")
    return message | {"role": "system" if role == "developer" else role, "content": content}


def _logprob_entries(table: torch.Tensor, tokens: list[int], alternatives: int) -> list[tuple[float, list]]:
    """Per row of a log-softmax table: the log probability of that row's token, and the `alternatives` likeliest
    tokens' as (token id, log probability). Whole-table operations: a few device reads, not a few per row."""
    # long whatever the list holds: an empty one (a one-token prompt's) would make a float tensor, not an index.
    chosen = table[torch.arange(len(tokens), device=table.device),
                   torch.tensor(tokens, dtype=torch.long, device=table.device)].tolist()
    if not alternatives:
        return [(logprob, []) for logprob in chosen]
    top = torch.topk(table, alternatives, dim=-1)
    return [(logprob, list(zip(ids, values)))
            for logprob, ids, values in zip(chosen, top.indices.tolist(), top.values.tolist())]


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """How many first tokens a and b share, at most limit. Windows compared in C, doubling while they match, then
    halving the one that does not: the cost follows the shared length, not the lists' (most slots share only a chat
    template's first tokens)."""
    low, high, width = 0, max(0, min(len(a), len(b), limit)), 64
    while low < high:  # a[:low] == b[:low]
        end = min(low + width, high)
        if a[low:end] != b[low:end]:
            high = end
            break
        low, width = end, width * 2
    else:
        return low
    while high - low > 1:  # a[:low] == b[:low], a[:high] != b[:high]
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s in text]
    return min(hits) if hits else None


def _load_tokenizer(model_dir: Path, hf_config: dict):
    import jinja2
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise ConfigError(f"{model_dir} has no tokenizer.json; the engine needs a fast tokenizer")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the tokenizers library raises a bare Exception
        raise ConfigError(f"{path} is not a readable tokenizer ({exc})") from None
    tokenizer_config = _json_file(model_dir / "tokenizer_config.json")
    source = _chat_template_source(model_dir, tokenizer_config)
    try:
        chat_template = _chat_environment().from_string(source) if source is not None else None
    except jinja2.TemplateError as exc:
        raise ConfigError(f"{model_dir}: the chat template does not compile ({exc})") from None
    # The special tokens a template may write ({{ bos_token }} in Llama's), as strings: transformers passes its
    # special_tokens_map. special_tokens_map.json fills in what an older checkpoint's config leaves out.
    token_map = _json_file(model_dir / "special_tokens_map.json")
    special_tokens = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = tokenizer_config.get(name) or token_map.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):  # unset ones stay undefined in the template (render as ""), never "None"
            special_tokens[name] = value
    eos = set()
    for source in (hf_config, _json_file(model_dir / "generation_config.json")):
        value = source.get("eos_token_id")
        eos.update(value if isinstance(value, list) else [value] if value is not None else [])
    token = special_tokens.get("eos_token")
    if token and tokenizer.token_to_id(token) is not None:
        eos.add(tokenizer.token_to_id(token))
    return tokenizer, chat_template, special_tokens, eos


def _json_file(path: Path) -> dict:
    """An optional JSON object beside the weights: {} when absent."""
    return read_json_object(path) if path.exists() else {}


def _chat_template_source(model_dir: Path, tokenizer_config: dict) -> str | None:
    """Where transformers finds the template: chat_template.jinja (what recent versions save) before the config's
    chat_template, which is a string or a list of named templates (of which the one named "default" is used)."""
    path = model_dir / "chat_template.jinja"
    if path.exists():
        return path.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _chat_environment():
    """A jinja environment like transformers' for chat templates. Templates come with checkpoints from anywhere:
    sandboxed, so one cannot reach Python's internals."""
    import datetime

    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        # A template's way to refuse a conversation (Llama 2: roles must alternate); render_chat answers it as 400.
        raise jinja2.TemplateError(message)

    def strftime_now(format):  # Llama 3.1's template writes today's date into the system prompt
        return datetime.datetime.now().strftime(format)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes <, >, & and ' for HTML; transformers' (and so the model's training) does not.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Generation(jinja2.ext.Extension):
        """transformers' `{% generation %}…{% endgeneration %}`: marks the assistant's text for training masks
        (return_assistant_tokens_mask); rendering a prompt, it is the text inside. Templates that use it (SmolLM3's,
        TRL's) failed to compile, and the engine did not load."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_inside"), [], [], body).set_lineno(lineno)

        def _inside(self, caller):
            return caller()

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols, Generation])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment
