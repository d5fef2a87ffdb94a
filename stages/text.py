"""The model's text side, shared by preprocess and postprocess: tokenizer, chat template, limits.

Everything comes from the model folder (``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja`` and ``special_tokens_map.json`` where present and, for built models,
``genai_config.json``), so a new model needs no code change.

Chat templates are rendered the way transformers' ``apply_chat_template`` renders them: the same
sandboxed Jinja environment (``trim_blocks``, ``lstrip_blocks``, loop controls, a pass-through
``{% generation %}`` tag), the same helpers (``raise_exception``, ``strftime_now``, a ``tojson``
that does not escape HTML, a guarded ``namespace``) and the same variables (``messages``,
``tools``, ``documents``, ``add_generation_prompt`` and the named special tokens such as
``bos_token`` and ``eos_token``). A template that refuses a conversation (``raise_exception``,
or a conversation shape it cannot render) makes the request invalid, not the stage faulty.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
import orjson
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from pipeline.errors import FatalError, InvalidInput

# The named special tokens transformers hands every template (``special_tokens_map``).
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}`` renders its body (transformers uses it to mark
    assistant tokens for training masks; serving only needs the text)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


class _TemplateDict:
    """``dict(...)`` inside a template, without handing it the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` refusing underscore-prefixed names, as transformers' does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's own signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes ({name!r})"
            )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Plain ``json.dumps`` (Jinja's own filter would HTML-escape ``<``, ``>``, ``&``, ``'``)."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def chat_environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment chat templates are written for (transformers' settings)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _token_text(value: object) -> str | None:
    """A special token as tokenizer configs write it: a string or an AddedToken object."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def special_tokens(config: Mapping[str, Any], tokens_map: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens a template sees: ``tokenizer_config.json`` first, then
    ``special_tokens_map.json`` for names it leaves unset (as transformers merges them), plus the
    model-specific names of a dict-shaped ``extra_special_tokens``."""
    merged: dict[str, str] = {}
    extra = config.get("extra_special_tokens") or tokens_map.get("extra_special_tokens")
    names = [*SPECIAL_TOKEN_NAMES, *(extra.keys() if isinstance(extra, Mapping) else ())]
    for name in names:
        for source in (config, tokens_map, extra if isinstance(extra, Mapping) else {}):
            text = _token_text(source.get(name))
            if text:
                merged[name] = text
                break
    return merged


def _read_template(folder: Path, config: Mapping[str, Any]) -> str:
    """``chat_template.jinja`` wins over the config's ``chat_template`` (transformers' order);
    a list of named templates gives its ``default``."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text("utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if not isinstance(template, str):
        raise FatalError(
            f"{folder / 'tokenizer_config.json'} has no chat_template (and there is no "
            f"{jinja_file.name}); a named template list needs one called 'default'"
        )
    return template


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise FatalError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise FatalError(f"{path} is not a JSON object")
    return data


@dataclass
class TextModel:
    name: str
    tokenizer: Tokenizer
    chat_template: str
    context_length: int
    eos_token_ids: tuple[int, ...]
    special_ids: frozenset[int]
    tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... by name
    model_vocab: int | None = None  # genai_config's vocab_size (the logits), where known
    _template: jinja2.Template = field(init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self._template = chat_environment().from_string(self.chat_template)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise FatalError(
                f"model {self.name}: the chat template does not compile: {exc}"
            ) from exc

    @classmethod
    def load(cls, folder: Path) -> TextModel:
        tok_path = folder / "tokenizer.json"
        cfg_path = folder / "tokenizer_config.json"
        if not tok_path.exists() or not cfg_path.exists():
            raise FatalError(
                f"model folder {folder} lacks tokenizer.json / tokenizer_config.json "
                "(set SLUICE_MODEL_PATH to a model built with: sluice model build)"
            )
        tokenizer = Tokenizer.from_file(str(tok_path))
        cfg = _read_json(cfg_path)
        map_path = folder / "special_tokens_map.json"
        tokens = special_tokens(cfg, _read_json(map_path) if map_path.exists() else {})
        template = _read_template(folder, cfg)
        context = int(cfg.get("model_max_length") or 2048)
        genai = folder / "genai_config.json"
        model_vocab = None
        if genai.exists():
            model = _read_json(genai)["model"]
            context = int(model.get("context_length", context))
            model_vocab = int(model["vocab_size"]) if model.get("vocab_size") else None
        eos_name = tokens.get("eos_token")
        eos_id = tokenizer.token_to_id(eos_name) if eos_name is not None else None
        eos = (eos_id,) if eos_id is not None else ()
        specials = frozenset(
            int(k) for k, v in cfg.get("added_tokens_decoder", {}).items() if v.get("special")
        )
        return cls(folder.name, tokenizer, template, context, eos, specials, tokens, model_vocab)

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary: genai_config's ``vocab_size`` (what the engine samples
        from), else the tokenizer's, added tokens included."""
        return self.model_vocab or int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def check_top_k(self, top_k: int | None) -> None:
        """Refuse a ``top_k`` above the vocabulary (the engine would fail on it) as invalid
        input naming the parameter; preprocess and compute call it before any work."""
        if top_k is not None and top_k > self.vocab_size:
            raise InvalidInput(
                f"top_k must be at most the model's vocabulary size {self.vocab_size}; got {top_k}",
                reason="schema",
                param="top_k",
            )

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The conversation through the chat template, as ``apply_chat_template(messages,
        tokenize=False, add_generation_prompt=True)`` renders it.

        Keys whose value is None are dropped from each message first (as transformers does).
        Raises ``InvalidInput`` (reason ``chat-template``) when the template refuses the
        conversation; the message is the template's own, never the prompt's text.
        """
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(
                {
                    **self.tokens,
                    "messages": chat,
                    "tools": list(tools) if tools is not None else None,
                    "documents": None,
                    "add_generation_prompt": add_generation_prompt,
                }
            )
        except jinja2.exceptions.TemplateError as exc:
            raise _refused(exc.message or type(exc).__name__) from exc
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            # Python's own text for these may quote the conversation: name the class only.
            raise _refused(f"{type(exc).__name__} while rendering it") from exc

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int], *, skip_special: bool = True) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special))


def _refused(why: str) -> InvalidInput:
    return InvalidInput(
        f"the model's chat template refused this conversation: {why}",
        reason="chat-template",
        param="messages",
    )


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able parts: the identity of a request for the response cache."""
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()
