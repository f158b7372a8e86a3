"""One exception hierarchy for gpuctl.

Every error a user can meet is a ``GpuctlError``. Each class knows the exit code the CLI
returns for it, the HTTP status the gateway answers with, and a hint that tells the user
what to do next. The CLI prints ``Error: <message>`` and ``Hint: <hint>`` and exits; the
gateway answers ``{"error": "<message>"}``. No other exception should reach a user.

    GpuctlError                      exit 1, HTTP 500
    ├── UsageError                   exit 2, HTTP 400  bad arguments, ambiguous GPU name
    ├── ConfigError                  exit 2            a broken config file or value
    ├── CredentialsError             exit 4, HTTP 502  token missing or rejected
    │   └── KeyringUnusable          exit 4            the keyring cannot store secrets
    ├── NotFoundError                exit 1, HTTP 404
    │   ├── GpuNotFound                                no workspace with that id/name
    │   └── ModelNotFound                              no GPU has (or can get) the model
    ├── CloudError                   exit 1, HTTP 502  the cloud API failed
    │   ├── CloudUnavailable                           5xx, timeouts, connection refused
    │   │   └── ActionUncertain                        an action POST went unanswered
    │   ├── CloudRateLimited                           429 that outlasted our retries
    │   └── ActionRefused            HTTP 409          400 from the cloud: "already resuming"
    ├── NotCloudManaged              HTTP 409          resume/pause of a static host
    ├── NodeError                    exit 1, HTTP 502  a GPU's Ollama failed or vanished
    ├── WakeFailed                   exit 1, HTTP 503  a resume failed or timed out
    │   └── NodeDown                                   a running GPU's Ollama does not answer
    ├── Unavailable                  exit 1, HTTP 503  queue full or wait limit passed
    └── SchemaTooNew                 exit 1            the database is from a newer gpuctl
"""

from __future__ import annotations

__all__ = [
    "ActionRefused",
    "ActionUncertain",
    "CloudError",
    "CloudRateLimited",
    "CloudUnavailable",
    "ConfigError",
    "CredentialsError",
    "GpuNotFound",
    "GpuctlError",
    "KeyringUnusable",
    "ModelNotFound",
    "NodeDown",
    "NodeError",
    "NotCloudManaged",
    "NotFoundError",
    "SchemaTooNew",
    "Unavailable",
    "UsageError",
    "WakeFailed",
    "retry_after",
]


class GpuctlError(Exception):
    """Base of every error gpuctl reports to a user."""

    exit_code: int = 1
    http_status: int = 500
    default_hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint

    def __str__(self) -> str:
        return self.message


class UsageError(GpuctlError):
    exit_code = 2
    http_status = 400


class ConfigError(GpuctlError):
    exit_code = 2
    default_hint = "Check the file with `gpuctl config show`, or fix it with `gpuctl config set`."


class CredentialsError(GpuctlError):
    exit_code = 4
    http_status = 502
    default_hint = (
        "Run `gpuctl auth login`, or set GPUCTL_API_TOKEN. "
        "Create a token in the SURF Research Cloud portal under Profile → API tokens. "
        "No account at hand? Try the simulated fleet: `gpuctl serve --demo`, then "
        "`gpuctl discover --demo`."
    )


class KeyringUnusable(CredentialsError):
    default_hint = (
        "No usable OS keyring here. Set GPUCTL_API_TOKEN, or put the token in a file and "
        "point GPUCTL_API_TOKEN_FILE at it."
    )


class NotFoundError(GpuctlError):
    http_status = 404


class GpuNotFound(NotFoundError):
    default_hint = "Run `gpuctl discover` to see the GPUs gpuctl can reach."


class ModelNotFound(NotFoundError):
    default_hint = "List the models with `gpuctl status`, or ask an admin to pull it."


class CloudError(GpuctlError):
    http_status = 502
    default_hint = "The SURF Research Cloud API failed; try again in a minute."


class CloudUnavailable(CloudError):
    pass


class ActionUncertain(CloudUnavailable):
    """An action POST timed out or its connection broke, and a read-back did not show it
    taken: the cloud may still act on it, so it must not be sent again at once."""

    default_hint = "The action may have been accepted; check with `gpuctl status`."


class CloudRateLimited(CloudError):
    default_hint = "The cloud API is rate-limiting this token; wait a minute and try again."

    def __init__(
        self, message: str, *, retry_after: float | None = None, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class ActionRefused(CloudError):
    http_status = 409
    default_hint = "Check the GPU's state with `gpuctl status`."


class NotCloudManaged(GpuctlError):
    http_status = 409
    default_hint = "Static hosts (cloud_api.provider = \"static\") are started and stopped by hand."


class NodeError(GpuctlError):
    http_status = 502


class WakeFailed(GpuctlError):
    """A resume failed; ``retry_after`` (seconds) is what a gateway client is told."""

    http_status = 503
    default_hint = "The cloud may be out of GPUs; try again later or resume another GPU."

    def __init__(
        self, message: str, *, retry_after: float = 60.0, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class NodeDown(WakeFailed):
    """A GPU the cloud says is running, whose Ollama did not answer a short probe: no
    resume was sent, so none failed; the GPU is marked failed and its requests move on."""

    default_hint = "Check the GPU node (`docker compose ps` on it), or pause and resume it."


class Unavailable(GpuctlError):
    """The gateway cannot take the request now; ``retry_after`` says when to try again."""

    http_status = 503

    def __init__(
        self, message: str, *, retry_after: float = 30.0, hint: str | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.retry_after = retry_after


class SchemaTooNew(GpuctlError):
    """The state database was written by a newer gpuctl; reading it could corrupt it."""


#: ``Retry-After`` of a 503 that does not know better.
DEFAULT_RETRY_AFTER = 30.0


def retry_after(exc: GpuctlError) -> float | None:
    """Seconds a gateway client is told to wait before trying again: an error that knows
    (``Unavailable`` and its 429 ``BudgetExceeded``, ``WakeFailed``) says so, and every
    503 says something; other errors say nothing."""
    value = getattr(exc, "retry_after", None)
    if isinstance(value, (int, float)):
        return float(value)
    return DEFAULT_RETRY_AFTER if exc.http_status == 503 else None
