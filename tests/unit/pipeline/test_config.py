from __future__ import annotations

import pytest
from pydantic import SecretStr, ValidationError

from pipeline.config import Settings, Topics


def test_every_topic_has_its_dead_letter_twin() -> None:
    topics = Topics("acme.")
    assert topics.all_topics() == [
        "acme.prompts",
        "acme.prompts.DLT",
        "acme.tokenized",
        "acme.tokenized.DLT",
        "acme.generated",
        "acme.generated.DLT",
        "acme.answers",
        "acme.answers.DLT",
        "acme.prompts.batch",
        "acme.prompts.batch.DLT",
        "acme.tokenized.batch",
        "acme.tokenized.batch.DLT",
        "acme.replies",
        "acme.control",
        "acme.batches",
    ]
    assert topics.edge_topics() == ["acme.replies", "acme.control"]


def test_reply_partitions_take_a_number_or_a_list_and_nothing_else() -> None:
    assert Settings(reply_partitions="3").reply_partitions == "3"
    assert Settings(reply_partitions=" 3, 4 ").reply_partitions == " 3, 4 "
    for bad in ("a", "3;4", "-1", "3,"):
        with pytest.raises(ValidationError):
            Settings(reply_partitions=bad)


def test_settings_come_from_sluice_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_BOOTSTRAP_SERVERS", "k1:9093,k2:9093")
    monkeypatch.setenv("SLUICE_PARTITIONS", "12")
    monkeypatch.setenv("SLUICE_S3_SECRET_ACCESS_KEY", "hunter2")
    s = Settings()
    assert s.bootstrap_servers == "k1:9093,k2:9093"
    assert s.partitions == 12
    assert isinstance(s.s3_secret_access_key, SecretStr)
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())


def test_sasl_scram_settings_reach_the_kafka_clients() -> None:
    s = Settings(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="svc",
        sasl_password=SecretStr("pw"),
    )
    kwargs = s.kafka_common()
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert kwargs["sasl_plain_username"] == "svc" and kwargs["sasl_plain_password"] == "pw"
    assert kwargs["ssl_context"] is not None


def test_sasl_without_credentials_is_refused() -> None:
    with pytest.raises(ValidationError, match="sasl_mechanism"):
        Settings(security_protocol="SASL_SSL")
    with pytest.raises(ValidationError, match="sasl_username"):
        Settings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN")


def test_bad_values_name_the_field() -> None:
    with pytest.raises(ValidationError, match="partitions"):
        Settings(partitions=0)


def test_settings_are_frozen_and_changed_only_by_copying() -> None:
    s = Settings(partitions=3)
    with pytest.raises(ValidationError, match="frozen"):
        s.partitions = 4  # type: ignore[misc]
    changed = s.model_copy(update={"partitions": 4})
    assert (s.partitions, changed.partitions) == (3, 4)
