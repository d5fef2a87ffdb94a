"""The committed demo model: its tokenizer, its chat template, and its built CPU folders."""

from __future__ import annotations

import json
import string
from pathlib import Path

import jinja2
import pytest
from tokenizers import Tokenizer

from models.demo import task
from tests.paths import REPO_ROOT

DEMO = REPO_ROOT / "models" / "demo"
BUILT = ("cpu-fp32", "cpu-int8")
QUESTIONS = 32


def _tokenizer_config(folder: Path) -> dict[str, object]:
    config: dict[str, object] = json.loads((folder / "tokenizer_config.json").read_text("utf-8"))
    return config


def _render(folder: Path, messages: list[dict[str, str]]) -> str:
    template = _tokenizer_config(folder)["chat_template"]
    assert isinstance(template, str)
    return (
        jinja2.Environment()
        .from_string(template)
        .render(messages=messages, add_generation_prompt=True)
    )


@pytest.mark.parametrize("folder", ["tokenizer", *BUILT])
def test_tokenizer_round_trips_ascii(folder: str) -> None:
    tok = Tokenizer.from_file(str(DEMO / folder / "tokenizer.json"))
    texts = [string.printable, "What is 37 + 58?", "Reverse: abcde", "  two  spaces\n\ttab "]
    for text in texts:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.get_vocab_size(with_added_tokens=True) <= 512


@pytest.mark.parametrize("folder", ["tokenizer", *BUILT])
def test_chat_template_is_chatml(folder: str) -> None:
    config = _tokenizer_config(DEMO / folder)
    assert config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|endoftext|>"
    assert config["bos_token"] is None
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Uppercase: hello"},
    ]
    assert _render(DEMO / folder, messages) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n"
        "<|im_start|>user\nUppercase: hello<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    tok = Tokenizer.from_file(str(DEMO / folder / "tokenizer.json"))
    ids = tok.encode(_render(DEMO / folder, messages[1:])).ids
    specials = [tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|im_start|>")]
    assert [i for i in ids if i >= 256] == specials


def test_task_splits_do_not_overlap() -> None:
    train = {ex.question for ex in task.train_examples(5000, seed=7)}
    held = task.held_out(500, seed=7)
    assert len({ex.question for ex in held}) == 500
    assert not train & {ex.question for ex in held}
    assert all(task.check(ex.question, f" {ex.answer}\n") for ex in held)
    assert not task.check("What is 2 + 2?", "5")
    assert task.check("Spell 907 in Zorbish", "mox nul fen")


@pytest.mark.parametrize("variant", BUILT)
def test_built_model_answers_held_out_questions(variant: str) -> None:
    from models.demo.evaluate import GenaiModel

    folder = DEMO / variant
    genai_config = json.loads((folder / "genai_config.json").read_text("utf-8"))
    assert genai_config["model"]["eos_token_id"] == 258
    assert genai_config["model"]["pad_token_id"] == 256
    assert genai_config["model"]["context_length"] == 256

    model = GenaiModel(folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    examples = task.held_out(QUESTIONS, seed=99)
    prompt = _render(folder, [{"role": "user", "content": examples[0].question}])
    assert model.encode_prompt(examples[0].question) == tok.encode(prompt).ids

    correct = sum(task.check(ex.question, model.answer(ex.question)) for ex in examples)
    assert correct >= 0.9 * QUESTIONS, f"{variant}: {correct}/{QUESTIONS} correct"
