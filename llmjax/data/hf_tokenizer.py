"""Tokenizers of Hugging Face models, read from their directory, with their chat templates.

A directory holds ``tokenizer.json`` (the ``tokenizers`` library's own file: model, normaliser,
pre-tokeniser, added tokens, post-processor) or, in older layouts, only a SentencePiece
``tokenizer.model``; beside it ``tokenizer_config.json`` (special tokens, added tokens, flags, the
chat template before transformers 5), ``special_tokens_map.json`` (older layouts),
``chat_template.jinja`` (transformers 5) and the model's ``generation_config.json``, whose
``eos_token_id`` lists every id that ends a turn.

``HFTokenizer`` encodes as ``transformers`` does (``tokenizer(text)["input_ids"]``): it runs the
same ``tokenizers`` file, and only applies the few settings transformers layers on top (special
tokens missing from the file, no truncation or padding, the clean-up of spaces when decoding).
It never imports transformers. ``open_tokenizer`` opens any tokenizer llmjax can read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
import tokenizers
from tokenizers import AddedToken

from llmjax.data.chat import mask_from_spans, render_chat_with_spans
from llmjax.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SENTENCEPIECE_FILE,
    UNK_ID,
    SentencePieceBackend,
    Tokenizer,
)
from llmjax.errors import DataError

TOKENIZER_JSON = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_FILE = "generation_config.json"
# Read in this order; the files a tokenizer was built from are what ``save`` writes and ``sha256`` hashes.
OPTIONAL_FILES = (CONFIG_FILE, SPECIAL_TOKENS_FILE, TEMPLATE_FILE, GENERATION_FILE)
# transformers' clean_up_tokenization, in its order: spaces a WordPiece decoder left before punctuation.
_CLEAN_UPS = [(" " + p, p) for p in (".", "?", "!", ",")] + [(" ' ", "'")]
_CLEAN_UPS += [(" " + p, p) for p in ("n't", "'m", "'s", "'ve", "'re")]


def _json(files: Mapping[str, bytes], name: str, where: str) -> dict[str, Any]:
    if name not in files:
        return {}
    try:
        value = json.loads(files[name])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{where}/{name} is not valid JSON ({e}); restore the file") from e
    if not isinstance(value, dict):
        raise DataError(f"{where}/{name} holds a {type(value).__name__}, not an object; restore it")
    return value


def _content(value: Any) -> str | None:
    """A special token's text: config files write it as a string or as an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(config: dict, legacy_map: dict) -> dict[str, str]:
    """Special tokens by name (``bos_token``...), as transformers reads them."""
    # Older layouts keep them in special_tokens_map.json, read only when the config has no
    # added_tokens_decoder; model-specific names (image_token...) count as named tokens too.
    merged = {**config, **({} if "added_tokens_decoder" in config else legacy_map)}
    extra = merged.get("extra_special_tokens")
    merged.update(extra if isinstance(extra, dict) else {})
    named = {k: _content(v) for k, v in merged.items() if k.endswith("_token")}
    return {k: v for k, v in named.items() if v is not None}


def _added_tokens(config: dict, where: str) -> dict[int, dict[str, Any]]:
    """``added_tokens_decoder``: id → {content, special, lstrip, rstrip, normalized, single_word}."""
    out = {}
    for key, token in (config.get("added_tokens_decoder") or {}).items():
        if not (isinstance(token, dict) and isinstance(token.get("content"), str)):
            raise DataError(f"{where}: added token {key} is {token!r}; give {{'content': ...}}")
        try:
            out[int(key)] = token
        except ValueError as e:
            raise DataError(f"{where}: added token id {key!r} is not an integer; fix it") from e
    return out


class _JsonBackend:
    """A ``tokenizers`` file, with the settings transformers applies when it loads one."""

    def __init__(self, data: bytes, config: dict, specials: dict[str, str], where: str):
        try:
            self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # the library raises bare Exceptions for a file it cannot parse
            raise DataError(f"{where}/{TOKENIZER_JSON} cannot be read ({e}); restore it") from e
        # Truncation and padding in the file apply only when a caller asks transformers for them.
        # What add_special_tokens adds is the file's post-processor: transformers 5 ignores the
        # config's add_bos_token/add_eos_token when a tokenizer.json exists.
        self._tok.no_truncation()
        self._tok.no_padding()
        known = self._tok.get_vocab(with_added_tokens=True)
        flags = ("single_word", "lstrip", "rstrip", "normalized", "special")
        missing = [
            AddedToken(t["content"], **{k: bool(t[k]) for k in flags if k in t})
            for _, t in sorted(_added_tokens(config, where).items())
            if t["content"] not in known
        ]
        missing += [
            AddedToken(c, special=True, normalized=False)
            for c in dict.fromkeys(specials.values())
            if c not in known and c not in {t.content for t in missing}
        ]
        if missing:
            self._tok.add_tokens(missing)
        self._tok.encode_special_tokens = bool(config.get("split_special_tokens", False))
        self.clean_up = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(self._tok.model).__name__ != "BPE"  # transformers never cleans up after BPE
        )
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
        return [
            e.ids
            for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        ]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        for spaced, joined in _CLEAN_UPS if self.clean_up else ():
            text = text.replace(spaced, joined)
        return text


class HFTokenizer:
    """A Hugging Face model's tokenizer: ids as transformers gives them, and its chat template.

    Built from the directory's files (name → bytes); ``HFTokenizer.load(directory)`` reads them.
    """

    def __init__(self, files: Mapping[str, bytes], where: str = "tokenizer"):
        self.files = dict(files)
        self.path = where
        config = _json(self.files, CONFIG_FILE, where)
        specials = _special_tokens(config, _json(self.files, SPECIAL_TOKENS_FILE, where))
        if TOKENIZER_JSON in self.files:
            self._backend = _JsonBackend(self.files[TOKENIZER_JSON], config, specials, where)
        elif SENTENCEPIECE_FILE in self.files:
            self._backend = SentencePieceBackend(
                self.files[SENTENCEPIECE_FILE],
                _added_tokens(config, where),
                specials,
                config,
                where,
            )
        else:
            raise DataError(
                f"{where} has neither {TOKENIZER_JSON} nor {SENTENCEPIECE_FILE}; give a Hugging Face "
                "tokenizer directory"
            )
        self.special_tokens: dict[str, str] = specials
        self.vocab_size: int = self._backend.vocab_size
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (
            self.token_to_id(specials[n]) if n in specials else None
            for n in ("bos_token", "eos_token", "pad_token", "unk_token")
        )
        ends = _json(self.files, GENERATION_FILE, where).get("eos_token_id")
        ends = ends if isinstance(ends, list) else [] if ends is None else [ends]
        # Chat models end a turn with their own token (<|eot_id|>, <|im_end|>), listed here.
        self.stop_ids: tuple[int, ...] = tuple(
            dict.fromkeys(i for i in [self.eos_id, *ends] if isinstance(i, int))
        )
        self.chat_templates = self._read_templates(config, where)
        self.chat_template: str | None = self.chat_templates.get("default")
        digest = hashlib.sha256()
        for name in sorted(self.files):
            digest.update(f"{name}\0{len(self.files[name])}\0".encode())
            digest.update(self.files[name])
        self.sha256: str = digest.hexdigest()

    def _read_templates(self, config: dict, where: str) -> dict[str, str]:
        if TEMPLATE_FILE in self.files:  # what transformers 5 writes; it wins over the config
            try:
                return {"default": self.files[TEMPLATE_FILE].decode("utf-8")}
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{where}/{TEMPLATE_FILE} is not UTF-8 text ({e}); restore it"
                ) from e
        value = config.get("chat_template")
        if value is None or isinstance(value, str):
            return {} if value is None else {"default": value}
        # Older configs list named templates: [{"name": "default", "template": "..."}, ...].
        if isinstance(value, list) and all(
            isinstance(t, dict)
            and isinstance(t.get("name"), str)
            and isinstance(t.get("template"), str)
            for t in value
        ):
            return {t["name"]: t["template"] for t in value}
        raise DataError(
            f"{where}/{CONFIG_FILE}: chat_template is neither text nor a list of named templates; fix it"
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> HFTokenizer:
        d = Path(directory)
        if not d.is_dir():
            raise DataError(
                f"tokenizer {str(d)!r} is not a directory; give a Hugging Face tokenizer directory"
            )
        model = TOKENIZER_JSON if (d / TOKENIZER_JSON).is_file() else SENTENCEPIECE_FILE
        return cls({n: _read(d / n) for n in (model, *OPTIONAL_FILES) if (d / n).is_file()}, str(d))

    def save(self, directory: str | os.PathLike) -> None:
        """Write the files this tokenizer was read from into ``directory``: a copy that loads the same."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            tmp = d / f"{name}.tmp{os.getpid()}"
            tmp.write_bytes(data)
            os.replace(tmp, d / name)  # atomic: a reader never sees half a file

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """``tokenizer(text, add_special_tokens=...)["input_ids"]``; special tokens in the text count."""
        return self._backend.encode_batch([text], add_special_tokens)[0]

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = False
    ) -> list[list[int]]:
        return self._backend.encode_batch(texts, add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def _template(self, name_or_text: str | None, tools) -> str:
        if name_or_text is not None:
            return self.chat_templates.get(name_or_text, name_or_text)
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if self.chat_template is None:
            named = sorted(self.chat_templates)
            has = f"only the named templates {named}" if named else "no chat template"
            raise DataError(
                f"tokenizer {self.path!r} has {has}; pass chat_template=<name or template>"
            )
        return self.chat_template

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        *,
        chat_template: str | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        return_assistant_tokens_mask: bool = False,
        **kwargs: Any,
    ) -> str | list[int] | tuple[list[int], list[int]]:
        """``messages`` rendered by the chat template, as transformers' ``apply_chat_template``.

        Returns the text when ``tokenize`` is false, else its ids (transformers'
        ``["input_ids"]``). ``return_assistant_tokens_mask`` also returns a 0/1 list, 1 on the
        tokens of the template's ``{% generation %}`` blocks. ``chat_template`` names one of the
        tokenizer's templates or gives one; ``kwargs`` reach the template as variables.
        """
        text, spans = render_chat_with_spans(
            self._template(chat_template, tools),
            messages,
            add_generation_prompt,
            tools,
            documents,
            **{**self.special_tokens, **kwargs},
        )
        if not tokenize:
            return text
        if not return_assistant_tokens_mask:
            return self.encode(text)
        ids, offsets = self._backend.encode_with_offsets(text)
        return ids, mask_from_spans(offsets, spans)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {str(path)!r} ({e.strerror or e}); make it readable") from e


def _is_llmjax_model(data: bytes) -> bool:
    """Whether a SentencePiece model has llmjax's special ids (pad 0, unk 1, bos 2, eos 3)."""
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except RuntimeError:
        return False
    return (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)


def open_tokenizer(path: str | os.PathLike) -> Tokenizer | HFTokenizer:
    """The tokenizer at ``path``: a Hugging Face directory, a ``tokenizer.json``, or a ``.model``.

    A SentencePiece model with llmjax's special ids and no ``tokenizer_config.json`` beside it
    is one llmjax trained: it opens as ``Tokenizer``. Everything else opens as ``HFTokenizer``.
    """
    p = Path(path)
    if p.is_dir():
        if (p / TOKENIZER_JSON).is_file():
            return HFTokenizer.load(p)
        if (p / SENTENCEPIECE_FILE).is_file():
            if not (p / CONFIG_FILE).is_file() and _is_llmjax_model(_read(p / SENTENCEPIECE_FILE)):
                return Tokenizer.load(p / SENTENCEPIECE_FILE)
            return HFTokenizer.load(p)
        found = sorted(c.name for c in p.iterdir())
        shown = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "") if found else "nothing"
        raise DataError(
            f"tokenizer directory {str(p)!r} holds {shown}; it needs {TOKENIZER_JSON} or "
            f"{SENTENCEPIECE_FILE} (with {CONFIG_FILE})"
        )
    if not p.is_file():
        raise DataError(
            f"tokenizer {str(p)!r}: no such file or directory; give a Hugging Face tokenizer "
            f"directory, a {TOKENIZER_JSON} or a SentencePiece .model file"
        )
    siblings = {n: _read(p.parent / n) for n in OPTIONAL_FILES if (p.parent / n).is_file()}
    if p.suffix == ".json":
        # Only a file named tokenizer.json is sure to share its directory's config files.
        extra = siblings if p.name == TOKENIZER_JSON else {}
        return HFTokenizer({TOKENIZER_JSON: _read(p), **extra}, str(p.parent))
    if p.suffix == ".model":
        data = _read(p)
        has_config = p.name == SENTENCEPIECE_FILE and (p.parent / CONFIG_FILE).is_file()
        if _is_llmjax_model(data) and not has_config:
            return Tokenizer.load(p)
        extra = siblings if p.name == SENTENCEPIECE_FILE else {}
        return HFTokenizer({SENTENCEPIECE_FILE: data, **extra}, str(p.parent))
    raise DataError(
        f"tokenizer {str(p)!r} is a {p.suffix or 'suffix-less'} file; give a Hugging Face tokenizer "
        f"directory, a {TOKENIZER_JSON} or a SentencePiece .model file"
    )


def keep_copy(tokenizer, out_dir, prefix: str) -> Path:
    """Save ``tokenizer`` into ``<out_dir>/tokenizer/`` once, named by its hash, so a run stays
    usable when the model it came from moves or changes (runs find it there by that hash)."""
    keep = Path(out_dir) / "tokenizer" / f"{prefix}-{tokenizer.sha256[:12]}"
    if isinstance(tokenizer, Tokenizer):  # llmjax's own: one SentencePiece file
        keep = keep.with_suffix(".model")
    if not keep.exists():
        tokenizer.save(keep)
    return keep
