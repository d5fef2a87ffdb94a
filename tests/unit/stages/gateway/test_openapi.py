"""The OpenAPI document says what the gateway answers: OpenAI errors, SSE, no 422."""

from __future__ import annotations

import orjson

from tests.unit.stages.gateway.fakes import MakeHttp


def test_the_openapi_spec_documents_openai_errors_and_no_422(make_http: MakeHttp) -> None:
    _, _, app = make_http()
    spec = app.openapi()
    post = spec["paths"]["/v1/chat/completions"]["post"]
    assert set(post["responses"]) == {"200", "400", "401", "413", "500", "503", "504"}
    assert "text/event-stream" in post["responses"]["200"]["content"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert "stream" in spec["info"]["description"].lower()
    assert "422" not in orjson.dumps(spec).decode()
    schemas = spec["components"]["schemas"]
    assert {"ChatCompletionRequest", "ChatMessage", "ErrorAnswer", "ChatCompletion"} <= set(schemas)
    assert {"HTTPValidationError", "ValidationError"}.isdisjoint(schemas)
    assert "$defs" not in orjson.dumps(schemas).decode()  # every reference resolves in place


def test_without_a_key_no_401_is_documented(make_http: MakeHttp) -> None:
    _, _, app = make_http(gateway_api_key=None)
    spec = app.openapi()
    for path in ("/v1/chat/completions", "/v1/models", "/v1/models/{model}"):
        for operation in spec["paths"][path].values():
            assert "401" not in operation["responses"], path
    assert "securitySchemes" not in spec.get("components", {})
