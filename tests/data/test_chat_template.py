"""Chat templates in the style of real model families, rendered as transformers renders them."""

import pytest

from llmjax.data import DataError, Tokenizer, TokenizerConfig
from llmjax.data.chat import BUILTIN_CHAT_TEMPLATE, render_chat, render_chat_with_spans
from llmjax.data.hf_tokenizer import open_tokenizer
from llmjax.errors import InputError
from tests.data.test_hf_tokenizer import save_hf, train_bpe

transformers = pytest.importorskip("transformers")

LLAMA3 = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] | trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = '' %}\n"
    "{%- endif %}\n"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}\n"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}\n"
    "{{- system_message }}\n"
    "{{- '<|eot_id|>' }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

CHATML = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- endif %}\n"
    "    {{- '\\n\\n# Tools\\n<tools>' }}\n"
    "    {%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}\n"
    "    {{- '\\n</tools><|im_end|>\\n' }}\n"
    "{%- elif messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- set ns = namespace(turns=0) %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'system' %}{% continue %}{% endif %}\n"
    "    {%- set ns.turns = ns.turns + 1 %}\n"
    "    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)

GEMMA = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = '' -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif -%}\n"
    "    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}\n"
    "    {{ message['content'] | trim }}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}\n"
)

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)

GENERATION = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

FAMILIES = {
    "llama3": (LLAMA3, "bytelevel", "<|begin_of_text|>", "<|eot_id|>"),
    "chatml": (CHATML, "bytelevel", None, "<|im_end|>"),
    "gemma": (GEMMA, "metaspace", "<bos>", "<eos>"),
    "mistral": (MISTRAL, "metaspace", "<s>", "</s>"),
    "generation": (GENERATION, "bytelevel", None, "<|im_end|>"),
}
CONTROL = {
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"],
    "chatml": ["<|im_start|>", "<|endoftext|>"],
    "gemma": ["<start_of_turn>", "<end_of_turn>", "<pad>"],
    "mistral": ["[INST]", "[/INST]"],
    "generation": ["<|im_start|>"],
}

SYSTEM = {"role": "system", "content": "You answer briefly. Ünïcode ok 🙂"}
CHATS = [
    [{"role": "user", "content": "hello world"}],
    [SYSTEM, {"role": "user", "content": "what is 3.14?"}],
    [
        SYSTEM,
        {"role": "user", "content": "  def f(x):\n\treturn x  "},
        {"role": "assistant", "content": "It returns x. 中文"},
        {"role": "user", "content": "and <|im_end|> or </s> inside text?"},
        {"role": "assistant", "content": "Those are read as written.", "tool_calls": None},
    ],
]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """``family(name)``: (our tokenizer, transformers' tokenizer) of one directory, built once."""
    built = {}

    def get(name):
        if name not in built:
            template, style, bos, eos = FAMILIES[name]
            specials = [t for t in (bos, eos, "<unk>" if style == "metaspace" else None) if t]
            raw = train_bpe(style, specials + CONTROL[name])
            d = tmp_path_factory.mktemp(name)
            extra = {"bos_token": bos} if bos else {}
            if style == "metaspace":
                extra["unk_token"] = "<unk>"
            save_hf(
                d, raw, template, eos_token=eos, additional_special_tokens=CONTROL[name], **extra
            )
            built[name] = open_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
        return built[name]

    return get


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_templates_match_transformers(family, name):
    tok, hf = family(name)
    chats = CHATS
    if name == "mistral":  # user and assistant only
        chats = [[m for m in chat if m["role"] != "system"] for chat in CHATS]
    for chat in chats:
        for gen in (False, True):
            text = tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert text == hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            ids = tok.apply_chat_template(chat, add_generation_prompt=gen)
            assert ids == hf.apply_chat_template(chat, add_generation_prompt=gen)["input_ids"]
            assert ids == tok.encode(text)


def test_tools_reach_the_template(family):
    tok, hf = family("chatml")
    tools = [
        {"type": "function", "function": {"name": "get_<weather>", "description": "Météo & co"}}
    ]
    chat = CHATS[1]
    got = tok.apply_chat_template(chat, tools=tools, tokenize=False)
    assert got == hf.apply_chat_template(chat, tools=tools, tokenize=False)
    assert '"Météo & co"' in got and "get_<weather>" in got  # tojson escapes neither
    assert (
        tok.apply_chat_template(chat, tools=tools)
        == hf.apply_chat_template(chat, tools=tools)["input_ids"]
    )


def test_generation_mask_matches_transformers(family):
    tok, hf = family("generation")
    chat = CHATS[2]
    ids, mask = tok.apply_chat_template(chat, return_assistant_tokens_mask=True)
    want = hf.apply_chat_template(chat, return_assistant_tokens_mask=True, return_dict=True)
    assert ids == want["input_ids"] and mask == want["assistant_masks"]
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m], False) == (
        "It returns x. 中文<|im_end|>Those are read as written.<|im_end|>"
    )


@pytest.mark.parametrize("name", ["gemma", "mistral"])
def test_raise_exception_surfaces(family, name):
    tok, hf = family(name)
    chat = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(DataError, match="Conversation roles must alternate user/assistant"):
        tok.apply_chat_template(chat)
    with pytest.raises(Exception, match="Conversation roles must alternate user/assistant"):
        hf.apply_chat_template(chat)


def test_render_errors():
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(DataError, match="syntax error on line 1"):
        render_chat("{% for m in messages %}{{ m.content }}", msgs)
    with pytest.raises(DataError, match="failed on these messages"):
        render_chat("{{ messages[0].content.missing.deeper }}", msgs)
    with pytest.raises(DataError, match="list of dicts"):
        render_chat("{{ 1 }}", "hello")
    with pytest.raises(DataError, match="message 0 is a str"):
        render_chat("{{ 1 }}", ["hello"])
    # The sandbox: templates cannot reach Python internals.
    with pytest.raises(DataError, match="failed on these messages"):
        render_chat("{{ messages.__class__.__mro__ }}", msgs)
    with pytest.raises(DataError, match="failed on these messages"):
        render_chat("{% set ns = namespace() %}{% set ns._x = 1 %}", msgs)
    with pytest.raises(InputError, match="continue_final_message"):
        render_chat("{{ 1 }}", msgs, continue_final_message=True)
    # Keys whose value is None are dropped, as if absent.
    assert (
        render_chat("{{ messages[0].get('tool_calls', 'none') }}", [{"tool_calls": None}]) == "none"
    )
    assert (
        render_chat(
            "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}", []
        )
        == "01"
    )


@pytest.fixture(scope="module")
def own():
    lines = [f"User:\nline {i} has words and {i * 7} numbers\nAssistant:\nok" for i in range(1500)]
    return Tokenizer.train(iter(lines), TokenizerConfig(400))


def test_builtin_template_for_llmjax_tokenizers(own):
    chat = CHATS[2]
    text = own.apply_chat_template(chat, tokenize=False)
    assert text.startswith("<s>System:\nYou answer briefly.")
    assert text.count("</s>\n") == len(chat)  # each turn ends in eos
    ids = own.apply_chat_template(chat, add_generation_prompt=True)
    assert ids[0] == own.bos_id and ids.count(own.eos_id) == len(chat)
    assert own.decode(ids, skip_special_tokens=False) == own.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False
    )
    # The eos closing each turn is an id; the "</s>" the user typed stays text.
    turns = own.decode(ids).split("\n")
    assert "and <|im_end|> or </s> inside text?" in turns
    ids, mask = own.apply_chat_template(chat, return_assistant_tokens_mask=True)
    assert ids == own.apply_chat_template(chat)
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert own.decode(trained, skip_special_tokens=False) == (
        "It returns x. 中文</s>Those are read as written.</s>"
    )
    text, spans = render_chat_with_spans(
        BUILTIN_CHAT_TEMPLATE, chat[:3], bos_token="B", eos_token="E"
    )
    assert [text[a:b] for a, b in spans] == ["It returns x. 中文E"]
