"""The model's text side, shared by preprocess and postprocess: tokenizer, chat template, limits.

Everything comes from the model folder (``tokenizer.json``, ``tokenizer_config.json`` and, for
built models, ``genai_config.json``), so a new model needs no code change.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from jinja2 import Template
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from pipeline.errors import FatalError


@dataclass
class TextModel:
    name: str
    tokenizer: Tokenizer
    chat_template: str
    context_length: int
    eos_token_ids: tuple[int, ...]
    special_ids: frozenset[int]
    _template: Template = field(init=False, repr=False)

    def __post_init__(self) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
        self._template = env.from_string(self.chat_template)

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
        cfg: dict[str, Any] = json.loads(cfg_path.read_text())
        template = cfg.get("chat_template")
        if not isinstance(template, str):
            raise FatalError(f"{cfg_path} has no chat_template")
        context = int(cfg.get("model_max_length") or 2048)
        genai = folder / "genai_config.json"
        if genai.exists():
            context = int(json.loads(genai.read_text())["model"].get("context_length", context))
        eos_names = [cfg.get("eos_token")] if isinstance(cfg.get("eos_token"), str) else []
        eos = tuple(i for n in eos_names if (i := tokenizer.token_to_id(str(n))) is not None)
        specials = frozenset(
            int(k) for k, v in cfg.get("added_tokens_decoder", {}).items() if v.get("special")
        )
        return cls(folder.name, tokenizer, template, context, eos, specials)

    def render(self, messages: list[dict[str, str]]) -> str:
        """The chat template, rendered in a sandbox (templates come with model files)."""
        return self._template.render(messages=messages, add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int], *, skip_special: bool = True) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special))


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able parts: the identity of a request for the response cache."""
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)).hexdigest()
