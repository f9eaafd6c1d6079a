"""Chat templates: the Jinja programs that turn a list of messages into one prompt string.

A Hugging Face chat model ships its template beside its tokenizer. ``render_chat`` renders one the
way ``transformers`` does, so the text (and so the token ids) a model is fine-tuned on is the text
it was trained to read: a sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``, the
``break``/``continue`` loop controls, the ``tojson`` filter that leaves non-ASCII and HTML
characters alone, the globals ``raise_exception`` and ``strftime_now``, and the ``{% generation %}``
tag that marks the assistant's text. The template sees ``messages``, ``add_generation_prompt``,
``tools``, ``documents``, every special token by name (``bos_token``, ``eos_token``...) and any
extra keyword.

``BUILTIN_CHAT_TEMPLATE`` is the template of the tokenizers llmjax trains itself, which have no
template of their own: plain-text role headers, ``eos_token`` closing each turn.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmjax.errors import DataError, InputError

# Each turn is "Role:\n" + content + eos, then a newline. The header ends in "\n", a symbol of its
# own in llmjax's tokenizers, so the prompt's last token is the same whether or not the model's
# answer follows it. The answer and its eos sit in a generation block: they are what is trained.
BUILTIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize + ':\\n' }}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('\\n') %}{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ text + eos_token }}{% endgeneration %}"
    "{% else %}{{ text + eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:\\n' }}{% endif %}"
)

_CALL_OPTIONS = {
    "continue_final_message",
    "sanitize_control_tokens",
    "return_dict",
    "return_tensors",
}
_CALL_OPTIONS |= {"padding", "truncation", "max_length", "tokenizer_kwargs"}
# Older names for a message's reasoning; templates read ``reasoning_content`` (gpt-oss: ``thinking``).
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")

# (rendered chunks so far, generation spans) while a render tracks ``{% generation %}`` blocks.
_tracking: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar(
    "chat_generation_tracking", default=None
)


class _TemplateRaised(jinja2.TemplateError):
    """What ``raise_exception(message)`` in a template raises: the template refused its input."""


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body and, when asked, records where."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller) -> str:
        text = caller()
        state = _tracking.get()
        if state is not None:
            # Everything before this block has been yielded already: its length is our offset.
            chunks, spans = state
            start = sum(map(len, chunks))
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message: Any):
    raise _TemplateRaised(str(message))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own filter escapes <, > and & for HTML, which would change the prompt text.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _SafeDict:
    """``dict(...)`` for templates, without handing them the ``dict`` type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _SafeNamespace(jinja2.utils.Namespace):
    """A ``namespace()`` that refuses underscore names, the way out to Python internals."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    # Templates come from model repositories: the sandbox keeps them from reaching Python itself.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_SafeDict(),
        namespace=_SafeNamespace,
    )
    return env


def compile_template(template: str) -> jinja2.Template:
    """The compiled template; ``DataError`` when it is not valid Jinja."""
    if not isinstance(template, str):
        raise DataError(f"chat template is a {type(template).__name__}; give the template text")
    return _compile(template)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(
            f"chat template has a syntax error on line {e.lineno}: {e.message}; fix the template"
        ) from e


def _plain(value: Any) -> Any:
    """``value`` rebuilt from JSON types, so the template only ever sees plain data."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    # Subclasses (enums, numpy strings) carry methods the sandbox does not know: strip them.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    # Media and other objects: templates only test that such keys exist, never read them.
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The messages as the template sees them: plain dicts, keys whose value is None dropped.

    APIs return ``content=None`` or ``tool_calls=None``; many templates print "None" for them but
    handle a missing key. Reasoning given under an older name is also readable as
    ``reasoning_content`` and ``thinking``.
    """
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise DataError(
            f"chat messages are a {type(messages).__name__}; give a list of dicts with 'role' and 'content'"
        )
    out = []
    for i, message in enumerate(_plain(list(messages))):
        if not isinstance(message, dict):
            raise DataError(
                f"chat message {i} is a {type(message).__name__}; give a dict with 'role' and 'content'"
            )
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_KEYS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _variables(messages, add_generation_prompt, tools, documents, variables) -> dict[str, Any]:
    # Options of transformers' apply_chat_template that llmjax leaves out: taken as template
    # variables they would be ignored without a word.
    if asked := sorted(set(variables) & _CALL_OPTIONS):
        raise InputError(f"chat rendering does not take {asked} (transformers options); drop them")
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise DataError(
            "chat tools must be JSON schemas (dicts); convert functions to schemas first"
        )
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise DataError("chat documents must be dicts with 'title' and 'text'; convert them first")
    return {
        **_plain(dict(variables)),
        "messages": normalize_messages(messages),
        "tools": _plain(tools),
        "documents": _plain(documents),
        "add_generation_prompt": bool(add_generation_prompt),
    }


def _run(template: str, variables: dict[str, Any], track: bool):
    compiled = compile_template(template)
    chunks: list[str] = []
    spans: list[tuple[int, int]] = []
    token = _tracking.set((chunks, spans)) if track else None
    try:
        for chunk in compiled.generate(**variables):
            chunks.append(chunk)
    except _TemplateRaised as e:
        raise DataError(
            f"the chat template refused the messages: {e.message}; change the messages to the form it expects"
        ) from e
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise DataError(
            f"the chat template failed on these messages ({type(e).__name__}: {e}); give the fields it reads"
        ) from e
    finally:
        if token is not None:
            _tracking.reset(token)
    return "".join(chunks), spans


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    **variables: Any,
) -> str:
    """``messages`` rendered by ``template``; ``variables`` carry the special tokens and extras.

    Raises ``DataError`` for a template that is not valid Jinja, for one that calls
    ``raise_exception`` (its message is in the error) and for one that fails on the messages.
    """
    text, _ = _run(
        template, _variables(messages, add_generation_prompt, tools, documents, variables), False
    )
    return text


def render_chat_with_spans(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    **variables: Any,
) -> tuple[str, list[tuple[int, int]]]:
    """``render_chat`` plus the ``[start, end)`` character spans of its ``{% generation %}`` blocks.

    The spans are the assistant's text, what supervised fine-tuning trains on; a template without
    the tag gives none.
    """
    return _run(
        template, _variables(messages, add_generation_prompt, tools, documents, variables), True
    )


def split_on_specials(
    text: str, specials: Mapping[str, int], strip: Mapping[str, tuple[bool, bool]] | None = None
) -> Iterator[tuple[int, int, int | None]]:
    """``text`` as ``(start, end, id)`` pieces: a special token's id, or None for the text between.

    Longer tokens match first, so ``<|im_end|>`` wins over a token ``<|im``. ``strip`` gives a
    token's (lstrip, rstrip): such a token also takes the whitespace on that side, as Hugging
    Face's added tokens do.
    """
    pos = 0
    if specials:
        contents = sorted(specials, key=len, reverse=True)
        strip = strip or {}
        parts = []
        for c in contents:
            left, right = strip.get(c, (False, False))
            parts.append(("\\s*" if left else "") + f"({re.escape(c)})" + ("\\s*" if right else ""))
        for m in re.finditer("|".join(parts), text):
            if m.start() > pos:
                yield pos, m.start(), None
            yield m.start(), m.end(), specials[contents[m.lastindex - 1]]
            pos = m.end()
    if pos < len(text):
        yield pos, len(text), None


def mask_from_spans(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]
) -> list[int]:
    """1 for each token whose ``[start, end)`` characters overlap one of ``spans``, else 0.

    Both lists are in text order, so one pass suffices. A token only partly inside a span (a
    merge across its edge) counts as inside: it carries some of the span's text.
    """
    mask, k = [0] * len(offsets), 0
    for t, (start, end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if end > spans[k][0]:
            mask[t] = 1
    return mask
