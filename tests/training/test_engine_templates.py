"""Checkpoints from elsewhere: chat templates render exactly as transformers' apply_chat_template renders them
(special tokens, raise_exception, strftime_now, named templates, chat_template.jinja), and prompts carry the BOS
their tokenizer adds. transformers reads the same folders from disk; nothing is downloaded."""
import datetime
import json
import shutil

import httpx
import jinja2
import pytest
from tokenizers import Tokenizer, processors

from training.config import ConfigError
from training.engine import Engine, EngineError
from training.serve import serve_in_thread

# Llama 2 chat's template, as meta-llama/Llama-2-7b-chat-hf ships it.
LLAMA_2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# What recent transformers saves as chat_template.jinja; uses what Llama 3.1's template uses (strftime_now,
# tojson) and a loop control.
JINJA_FILE = (
    "{{ bos_token }}Today is {{ strftime_now('%Y') }}.\n"
    "{% for message in messages %}{% if loop.index0 > 2 %}{% break %}{% endif %}"
    "{{ message['role'] }}: {{ message['content'] | tojson }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# The assistant's part marked for training masks, as SmolLM3's and TRL's templates do.
GENERATION_TAG = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}<|assistant|>\n{% generation %}"
    "{{ message['content'] }}{{ eos_token }}{% endgeneration %}\n"
    "{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "def add(a, b):"}],
    [{"role": "system", "content": "Answer in <code> & 'prose'."}, {"role": "user", "content": " hi "},
     {"role": "assistant", "content": "x = 1"}, {"role": "user", "content": "and <b> & 'c'?"}],
]


def llama_like(source, target):
    """Our export made to look like a Llama checkpoint: its special tokens renamed <s> and </s> (the model's
    vocabulary is fixed, so existing ids stand in), a post-processor that puts <s> before every prompt, and the
    templates as a list of named ones in tokenizer_config.json, bos_token as a dict."""
    shutil.copytree(source, target)
    data = json.loads((target / "tokenizer.json").read_text())
    renames = {"<|system|>": "<s>", "<|endoftext|>": "</s>"}
    for token in data["added_tokens"]:
        token["content"] = renames.get(token["content"], token["content"])
    data["model"]["vocab"] = {renames.get(k, k): v for k, v in data["model"]["vocab"].items()}
    (target / "tokenizer.json").write_text(json.dumps(data))
    tokenizer = Tokenizer.from_file(str(target / "tokenizer.json"))
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", bos)])
    tokenizer.save(str(target / "tokenizer.json"))
    config = json.loads((target / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {k: v | {"content": renames.get(v["content"], v["content"])}
                                      for k, v in config["added_tokens_decoder"].items()}
    config |= {"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                             "rstrip": False, "single_word": False},
               "eos_token": "</s>", "pad_token": None,
               "chat_template": [{"name": "default", "template": LLAMA_2}, {"name": "tool_use", "template": "no"}]}
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    (target / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return target


@pytest.fixture(scope="module")
def llama_dir(trained, tmp_path_factory):
    return llama_like(trained / "export", tmp_path_factory.mktemp("llama") / "export")


@pytest.fixture(scope="module")
def engine(llama_dir):
    return Engine(llama_dir, device="cpu", max_batch=2)


def hf_tokenizer(folder, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def test_a_llama_2_template_renders_and_encodes_as_transformers_does(engine, llama_dir, monkeypatch):
    hf = hf_tokenizer(llama_dir, monkeypatch)
    for messages in CONVERSATIONS:
        text = engine.render_chat(messages)
        assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.startswith("<s>[INST] ")  # bos_token, given as a dict in tokenizer_config.json
        ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
        # One <s> per user turn, from the template: encoding adds none of its own.
        assert engine.encode_chat(messages) == ids["input_ids"]
        assert engine.encode_chat(messages).count(hf.bos_token_id) == text.count("<s>")


def test_a_template_that_refuses_the_messages_is_a_400_saying_why(engine, llama_dir, monkeypatch):
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        hf_tokenizer(llama_dir, monkeypatch).apply_chat_template(twice, tokenize=False)
    with pytest.raises(EngineError, match="roles must alternate") as refused:
        engine.render_chat(twice)
    assert (refused.value.status, refused.value.param) == (400, "messages")


def test_openai_message_forms_render_as_their_plain_equivalents_and_tool_turns_are_refused(engine):
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}]
    newer = [{"role": "developer", "content": "Be brief."},  # OpenAI's new name for system
             {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert engine.render_chat(newer) == engine.render_chat(plain)
    for bad, says in [({"role": "tool", "tool_call_id": "1", "content": "sunny"}, "no tool calling"),
                      ({"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, "tool calls"),
                      ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "text only"),
                      ({"role": "user", "content": 3}, "string or a list of text parts")]:
        with pytest.raises(EngineError, match=says) as refused:
            engine.render_chat([{"role": "user", "content": "hi"}, bad])
        assert (refused.value.status, refused.value.param) == (400, "messages")
        assert "messages[1]" in str(refused.value)


def test_completions_prompts_carry_the_bos_the_tokenizer_adds(engine, llama_dir, trained, monkeypatch):
    hf = hf_tokenizer(llama_dir, monkeypatch)
    for prompt in ["def add(a, b):", "import os"]:
        assert engine.encode(prompt) == hf(prompt).input_ids
        assert engine.encode(prompt)[0] == hf.bos_token_id
    # Our own exports add nothing: their prompts are as before, and as transformers encodes them.
    ours = Engine(trained / "export", device="cpu", max_batch=2)
    ours_hf = hf_tokenizer(trained / "export", monkeypatch)
    for prompt in ["def add(a, b):", "import os"]:
        assert ours.encode(prompt) == ours.encode(prompt, add_special_tokens=False) == ours_hf(prompt).input_ids


def test_the_server_encodes_and_refuses_as_transformers_does(llama_dir, monkeypatch):
    hf = hf_tokenizer(llama_dir, monkeypatch)
    server = serve_in_thread(str(llama_dir), model_id="acme/llama", device="cpu", max_batch=2)
    base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        done = httpx.post(base + "/completions", json={"prompt": "def add(a, b):", "max_tokens": 2}, timeout=30)
        assert done.json()["usage"]["prompt_tokens"] == len(hf("def add(a, b):").input_ids)
        messages = CONVERSATIONS[0]  # the other one is longer than this model's context of 64
        chat = httpx.post(base + "/chat/completions", json={"messages": messages, "max_tokens": 2}, timeout=30)
        assert chat.status_code == 200, chat.text
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert chat.json()["usage"]["prompt_tokens"] == len(expected)
        refused = httpx.post(base + "/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "messages"
        assert "Conversation roles must alternate user/assistant" in error["message"]
    finally:
        server.shutdown()


def test_chat_template_jinja_is_preferred_and_has_transformers_helpers(llama_dir, tmp_path, monkeypatch):
    folder = tmp_path / "export"
    shutil.copytree(llama_dir, folder)
    (folder / "chat_template.jinja").write_text(JINJA_FILE)  # wins over the config's list, as in transformers
    engine = Engine(folder, device="cpu", max_batch=2)
    hf = hf_tokenizer(folder, monkeypatch)
    for messages in CONVERSATIONS:
        text = engine.render_chat(messages)
        assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.startswith(f"<s>Today is {datetime.date.today().year}.") and text.endswith("assistant:")
    assert "\"and <b> & 'c'?\"" not in engine.render_chat(CONVERSATIONS[1])  # the loop broke after three
    # tojson as transformers': no HTML escapes (jinja's own writes \u003c for <)
    assert "system: \"Answer in <code> & 'prose'.\"</s>" in engine.render_chat(CONVERSATIONS[1])


def test_a_template_marking_the_assistants_part_renders_as_transformers_does(llama_dir, tmp_path, monkeypatch):
    folder = tmp_path / "export"
    shutil.copytree(llama_dir, folder)
    (folder / "chat_template.jinja").write_text(GENERATION_TAG)
    engine = Engine(folder, device="cpu", max_batch=2)
    hf = hf_tokenizer(folder, monkeypatch)
    for messages in CONVERSATIONS:
        assert engine.render_chat(messages) == hf.apply_chat_template(messages, tokenize=False,
                                                                      add_generation_prompt=True)
    assert "<|assistant|>\nx = 1</s><|user|>" in engine.render_chat(CONVERSATIONS[1])  # trim_blocks, as there


def _damaged(source, tmp_path, damage):
    import shutil

    folder = tmp_path / "damaged"
    shutil.copytree(source, folder)
    damage(folder)
    return folder


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "chat_template.jinja").write_text("{% for m in messages %}"), "the chat template does not compile"),
    (lambda d: (d / "tokenizer.json").write_text("{"), "tokenizer.json is not a readable tokenizer"),
    (lambda d: (d / "generation_config.json").write_text("{"), "generation_config.json is not valid JSON"),
    (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), "PyTorch .bin weights are not read"),
])
def test_a_checkpoint_the_engine_cannot_serve_is_refused_naming_what_is_wrong(llama_dir, tmp_path, damage, message):
    with pytest.raises(ConfigError, match=message):
        Engine(_damaged(llama_dir, tmp_path, damage), device="cpu", max_batch=1)


@pytest.mark.parametrize("kwargs, message", [({"device": "foo"}, "device must be auto, cpu, cuda or cuda:N"),
                                             ({"max_batch": 0}, "max_batch must be at least 1")])
def test_engine_settings_that_cannot_serve_are_refused(llama_dir, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Engine(llama_dir, **{"device": "cpu", "max_batch": 1} | kwargs)


def test_a_template_failing_on_the_messages_is_a_400_not_a_500(llama_dir, tmp_path):
    folder = _damaged(llama_dir, tmp_path, lambda d: (d / "chat_template.jinja").write_text(
        "{{ messages[0]['content'] + 1 }}"))
    with pytest.raises(EngineError, match="chat template failed on these messages") as refused:
        Engine(folder, device="cpu", max_batch=1).render_chat([{"role": "user", "content": "hi"}])
    assert (refused.value.status, refused.value.param) == (400, "messages")
