"""The OpenAI-compatible HTTP gateway: chat completions over Kafka, for any OpenAI client.

| module       | what                                                                     |
|--------------|--------------------------------------------------------------------------|
| `app.py`     | the FastAPI app, its routers (chat, models, probes), `run_gateway`       |
| `bodies.py`  | the request and response bodies of the gateway's own routes              |
| `errors.py`  | errors as OpenAI error objects and the HTTP status of each               |
| `auth.py`    | the API key (Bearer auth), when one is configured                        |
| `sse.py`     | Server-Sent Events in OpenAI's `chat.completion.chunk` stream format     |
| `openapi.py` | the OpenAPI document, corrected to say what the gateway really answers   |
| `metrics.py` | `sluice_gateway_*` Prometheus metrics and the middleware that counts     |
| `files.py`   | the Files API (`/v1/files`), files in the archive's object store         |
| `batches.py` | the Batches API (`/v1/batches`), state read from the batches topic       |
| `multipart.py` | the `multipart/form-data` bodies of file uploads                       |

A new group of routes is a new module with a function that builds its ``APIRouter`` from what
it needs (settings, the client, ``Auth``); ``create_app`` includes it.

Run: ``python -m stages.gateway`` or ``sluice run gateway``.
"""

from stages.gateway.app import create_app, main, run_gateway, serve
from stages.gateway.bodies import ChatCompletionRequest, ModelCard, ModelList, Probe
from stages.gateway.errors import OpenAIHTTPError, error_response
from stages.gateway.metrics import GatewayMetrics
from stages.gateway.sse import sse_body

__all__ = [
    "ChatCompletionRequest",
    "GatewayMetrics",
    "ModelCard",
    "ModelList",
    "OpenAIHTTPError",
    "Probe",
    "create_app",
    "error_response",
    "main",
    "run_gateway",
    "serve",
    "sse_body",
]
