"""The gateway's API key: Bearer auth on the OpenAI routes, only when a key is configured.

``bearer_auth(key)`` gives the dependencies a guarded route (or router) takes and the error
statuses its OpenAPI entry documents; with no key both are empty and every route is open.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Depends
from fastapi.params import Depends as DependsParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from schemas.messages import INVALID_REQUEST_ERROR, ErrorAnswer
from stages.gateway.errors import OpenAIHTTPError

MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
CHALLENGE = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True)
class Auth:
    """What a guarded route adds: ``dependencies`` to check the key, ``errors`` to document."""

    dependencies: list[DependsParam]
    errors: tuple[int, ...]


def bearer_auth(api_key: SecretStr | None) -> Auth:
    """Routes guarded by ``api_key`` (401 without it or with another); open when it is None."""
    if api_key is None:
        return Auth([], ())
    expected = api_key.get_secret_value().encode()
    bearer = HTTPBearer(auto_error=False, description="The gateway's API key, if it has one.")

    async def authorize(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> None:
        if credentials is None:
            raise OpenAIHTTPError(
                401, ErrorAnswer.build(MISSING_KEY, type=INVALID_REQUEST_ERROR), CHALLENGE
            )
        if not hmac.compare_digest(credentials.credentials.encode(), expected):
            answer = ErrorAnswer.build(
                "Incorrect API key provided.", type=INVALID_REQUEST_ERROR, code="invalid_api_key"
            )
            raise OpenAIHTTPError(401, answer, CHALLENGE)

    return Auth([Depends(authorize)], (401,))
