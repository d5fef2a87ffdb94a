"""Chat templates render exactly as transformers' ``apply_chat_template`` renders them.

Each family's tokenizer folder is written here (a tiny word-level ``tokenizer.json`` plus a
``tokenizer_config.json`` in the family's shape); the ``tools``-marked tests load the same folder
with transformers and compare the text byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, models, pre_tokenizers

from pipeline.errors import FatalError, InvalidInput
from stages.text import TextModel, special_tokens
from tests.paths import REPO_ROOT

CHATML = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}{% continue %}{% endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}{% generation %}{{ message.content }}{% endgeneration %}
        {{- '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Plain block tags on their own, indented lines: trim_blocks and lstrip_blocks decide the text.
LLAMA3 = """\
{{- bos_token }}
{% set date_string = strftime_now("%d %b %Y") %}
{% if messages[0]['role'] == 'system' %}
    {% set system_message = messages[0]['content'] | trim %}
    {% set messages = messages[1:] %}
{% else %}
    {% set system_message = "" %}
{% endif %}
<|start_header_id|>system<|end_header_id|>

Cutting Knowledge Date: December 2023
Today Date: {{ date_string }}

{% if tools is not none %}
Tools: {{ tools | tojson(indent=4) }}

{% endif %}
{{ system_message }}<|eot_id|>
{% for message in messages %}
    {% if message['role'] == 'ipython' %}{% break %}{% endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{{ message['content'] | trim }}<|eot_id|>
{% endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}
"""

MISTRAL = """\
{% if messages[0]['role'] == 'system' %}
    {% set system_message = messages[0]['content'] %}
    {% set loop_messages = messages[1:] %}
{% else %}
    {% set loop_messages = messages %}
{% endif %}
{{- bos_token }}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {% if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {% else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {% endif %}
    {% elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token }}
    {% else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {% endif %}
{% endfor %}
"""

GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "chatml": (CHATML, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "llama3": (
        LLAMA3,
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    ),
    "mistral": (
        MISTRAL,
        {
            "bos_token": {"content": "<s>", "__type": "AddedToken", "special": True},
            "eos_token": "</s>",
            "unk_token": "<unk>",
        },
    ),
    "gemma": (
        GEMMA,
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
    ),
}

SYSTEM = {"role": "system", "content": "  Answer briefly.  "}
USER = {"role": "user", "content": "What is <b>37 & 58</b>? Say 'ünïcode' too.\n"}
ASSISTANT = {"role": "assistant", "content": " 95 "}
AGAIN = {"role": "user", "content": "And twice that?"}
CONVERSATIONS = {
    "one-user": [USER],
    "multi-turn": [USER, ASSISTANT, AGAIN],
    "system": [SYSTEM, USER],
    "system-multi-turn": [SYSTEM, USER, ASSISTANT, AGAIN],
}
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"a": "<int>"}}}]


def _token(value: object) -> str:
    return value if isinstance(value, str) else str(value["content"])  # type: ignore[index]


def write_model(folder: Path, template: str, tokens: dict[str, Any]) -> Path:
    """A model folder transformers and TextModel both load: word-level vocabulary, the family's
    special tokens as added tokens, the template in ``tokenizer_config.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    specials = [_token(v) for v in tokens.values()]
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 4096,
        "chat_template": template,
        **tokens,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
    return folder


def _transformers_render(folder: Path, messages: list[dict[str, str]], **kwargs: Any) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )
    assert isinstance(text, str)
    return text


def _supported(family: str, messages: list[dict[str, str]]) -> bool:
    return not (family == "gemma" and messages[0]["role"] == "system")


@pytest.mark.tools
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_renders_what_transformers_renders(tmp_path: Path, family: str, conversation: str) -> None:
    template, tokens = FAMILIES[family]
    folder = write_model(tmp_path / family, template, tokens)
    messages = CONVERSATIONS[conversation]
    model = TextModel.load(folder)
    if not _supported(family, messages):
        with pytest.raises(jinja2.TemplateError, match="System role not supported"):
            _transformers_render(folder, messages)
        with pytest.raises(InvalidInput, match="System role not supported") as info:
            model.render(messages)
        assert info.value.reason == "chat-template"
        assert not info.value.fault
        return
    expected = _transformers_render(folder, messages)
    assert model.render(messages) == expected
    # The bare Jinja environment Sluice used before renders these differently (or not at all).
    assert _bare_render(template, messages) != expected


def _bare_render(template: str, messages: list[dict[str, str]]) -> str | None:
    try:
        bare = ImmutableSandboxedEnvironment().from_string(template)
        return bare.render(messages=messages, add_generation_prompt=True)
    except jinja2.TemplateError:  # no loop controls, no eos_token, no raise_exception
        return None


@pytest.mark.tools
@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_tools_reach_the_template_as_transformers_passes_them(tmp_path: Path, family: str) -> None:
    template, tokens = FAMILIES[family]
    folder = write_model(tmp_path / family, template, tokens)
    expected = _transformers_render(folder, [USER], tools=TOOLS)
    assert TextModel.load(folder).render([USER], tools=TOOLS) == expected
    assert '"<int>"' in expected  # tojson does not HTML-escape


@pytest.mark.tools
def test_a_refused_alternation_is_refused_by_both(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "mistral", *FAMILIES["mistral"])
    messages = [USER, AGAIN]
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        _transformers_render(folder, messages)
    with pytest.raises(InvalidInput, match="must alternate"):
        TextModel.load(folder).render(messages)


# --- without transformers --------------------------------------------------------------------


def test_special_tokens_come_from_the_config_then_the_map(tmp_path: Path) -> None:
    tokens = special_tokens(
        {"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": None},
        {"eos_token": "</s>", "pad_token": {"content": "<pad>"}, "bos_token": "<ignored>"},
    )
    assert tokens == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    extra = special_tokens({"extra_special_tokens": {"image_token": "<img>"}}, {})
    assert extra == {"image_token": "<img>"}


def test_the_rendered_prompt_carries_bos_and_the_exact_whitespace(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "mistral", *FAMILIES["mistral"])
    model = TextModel.load(folder)
    # Block tags leave no indentation behind (lstrip_blocks) and eat their own newline
    # (trim_blocks); the newline after an expression stays, as it does in transformers.
    assert model.render([SYSTEM, USER]) == (
        "<s>\n[INST]   Answer briefly.  \n\nWhat is <b>37 & 58</b>? Say 'ünïcode' too.\n[/INST]\n"
    )
    assert model.render([USER, ASSISTANT, AGAIN]) == (
        "<s>\n[INST] What is <b>37 & 58</b>? Say 'ünïcode' too.\n[/INST]\n  95 </s>\n"
        "[INST] And twice that?[/INST]\n"
    )
    assert model.eos_token_ids == (model.tokenizer.token_to_id("</s>"),)


def test_none_valued_keys_are_dropped_before_rendering(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "t", "{{ messages[0] | tojson }}", {"eos_token": "</s>"})
    rendered = TextModel.load(folder).render([{"role": "user", "content": "hi", "name": None}])
    assert rendered == '{"role": "user", "content": "hi"}'


def test_chat_template_jinja_wins_over_the_config(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "t", "from the config", {"eos_token": "</s>"})
    (folder / "chat_template.jinja").write_text("from the file {{ eos_token }}", "utf-8")
    assert TextModel.load(folder).render([USER]) == "from the file </s>"


def test_a_named_template_list_gives_its_default(tmp_path: Path) -> None:
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    folder = write_model(tmp_path / "t", "unused", {"eos_token": "</s>"})
    config = json.loads((folder / "tokenizer_config.json").read_text("utf-8"))
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    assert TextModel.load(folder).render([USER]) == "plain"
    config["chat_template"] = [named[0]]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(FatalError, match="'default'"):
        TextModel.load(folder)


def test_a_template_that_does_not_compile_is_one_clear_error(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "t", "{% for m in messages %}", {"eos_token": "</s>"})
    with pytest.raises(FatalError, match="does not compile"):
        TextModel.load(folder)


@pytest.mark.parametrize(
    "template",
    [
        "{% set ns = namespace(_x=1) %}",
        "{% set ns = namespace() %}{% set ns._x = 1 %}",
        "{{ messages.__class__ }}{{ ''.__class__.__mro__ }}",
    ],
)
def test_the_sandbox_refuses_escapes(tmp_path: Path, template: str) -> None:
    folder = write_model(tmp_path / "t", template, {"eos_token": "</s>"})
    model = TextModel.load(folder)
    try:
        rendered = model.render([USER])
    except InvalidInput as exc:
        assert exc.reason == "chat-template"
    else:  # the sandbox renders unsafe attribute access as undefined (empty)
        assert rendered == ""


def test_a_type_error_in_the_template_does_not_quote_the_prompt(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "t", "{{ messages[0].content + 1 }}", {"eos_token": "</s>"})
    with pytest.raises(InvalidInput) as info:
        TextModel.load(folder).render([{"role": "user", "content": "secret words"}])
    assert "secret" not in info.value.message
    assert "TypeError" in info.value.message


def test_the_generation_tag_renders_its_body(tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}[{% generation %}{{ m.content }}{% endgeneration %}]{% endfor %}"
    )
    folder = write_model(tmp_path / "t", template, {"eos_token": "</s>"})
    assert TextModel.load(folder).render([USER, ASSISTANT]) == f"[{USER['content']}][ 95 ]"


@pytest.mark.parametrize("folder", ["tokenizer", "cpu-fp32", "cpu-int8"])
def test_the_demo_model_renders_what_it_rendered_before(folder: str) -> None:
    path = REPO_ROOT / "models" / "demo" / folder
    model = TextModel.load(path)
    config = json.loads((path / "tokenizer_config.json").read_text("utf-8"))
    before = jinja2.Environment().from_string(config["chat_template"])
    for messages in CONVERSATIONS.values():
        expected = before.render(messages=messages, add_generation_prompt=True)
        assert model.render(messages) == expected
    assert model.render([{"role": "user", "content": "Uppercase: hello"}]) == (
        "<|im_start|>user\nUppercase: hello<|im_end|>\n<|im_start|>assistant\n"
    )
    assert model.eos_token_ids == (258,)
