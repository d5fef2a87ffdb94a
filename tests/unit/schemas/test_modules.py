"""The message models live in three modules; ``schemas.messages`` still names every one of them."""

from __future__ import annotations

import schemas
import schemas.answers
import schemas.messages
import schemas.wire


def test_every_name_of_schemas_messages_is_the_object_its_home_module_defines() -> None:
    homes = (schemas.answers, schemas.wire)
    for name in schemas.messages.__all__:
        value = getattr(schemas.messages, name)
        for home in homes:
            if hasattr(home, name):
                assert getattr(home, name) is value, name
        assert getattr(schemas, name) is value, name  # the package re-exports it too


def test_the_answer_side_and_the_codec_are_reexported() -> None:
    answer_side = {"ChatCompletion", "ErrorAnswer", "Usage", "decode_answer", "CE_ANSWER"}
    codec = {"WireModel", "Message", "encode", "decode"}
    assert answer_side | codec <= set(schemas.messages.__all__)
    assert schemas.messages.ChatCompletion.__module__ == "schemas.answers"
    assert schemas.messages.encode.__module__ == "schemas.wire"
    assert schemas.messages.PromptMessage.__module__ == "schemas.messages"
