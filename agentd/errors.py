"""The agentd error tree: providers translate SDK errors into it; the executor acts on it."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_NOW = 75  # EX_TEMPFAIL: over budget, or the loop is paused
EXIT_CONFIG = 78  # EX_CONFIG: invalid configuration or a missing API key


class AgentdError(Exception):
    """Base of every error agentd raises on purpose."""

    exit_code = EXIT_FAILED


class ConfigError(AgentdError):
    """The configuration is invalid: names the file, key path, problem and maybe the line."""

    exit_code = EXIT_CONFIG

    def __init__(
        self, file: str, problem: str, key_path: str = "", line: int | None = None
    ) -> None:
        self.file = file
        self.key_path = key_path
        self.problem = problem
        self.line = line
        super().__init__(self.render())

    def render(self) -> str:
        """One readable line: `file:line: key.path: problem`."""
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.key_path:
            return f"{where}: {self.key_path}: {self.problem}"
        return f"{where}: {self.problem}"


class MissingKeyError(AgentdError):
    """A provider's API key is not set; names the env var or file, never a value."""

    exit_code = EXIT_CONFIG


class LedgerError(AgentdError):
    """The ledger cannot be opened or written; no model call is made without it."""


class BudgetExceeded(AgentdError):
    """A reservation does not fit in at least one budget window."""

    exit_code = EXIT_NOT_NOW

    def __init__(self, message: str, window: str = "") -> None:
        self.window = window
        super().__init__(message)


class LoopPaused(AgentdError):
    """The loop is paused; the run is not made now."""

    exit_code = EXIT_NOT_NOW


class LoopBusy(AgentdError):
    """A run of the loop is already in progress (in this or another process)."""

    exit_code = EXIT_NOT_NOW


class RunFailed(AgentdError):
    """Every model of the run's chain failed (the message lists the last error of each)."""


class NoModelFits(RunFailed):
    """No plan of the call had a model left to try (context windows too small, or only the
    deep tier for an interactive loop): nothing was attempted."""


class ProviderError(AgentdError):
    """A provider call failed. Subclasses say what the executor should do about it.

    `code` is the stable name written to the ledger's `error_type` column.
    `may_have_billed` is true when the request reached the provider and no usage came back:
    such an attempt settles at its reservation, not at zero.
    """

    code = "provider_error"
    retryable = False  # retry the same model (with backoff)
    next_provider_only = False  # skip the remaining models of the same provider
    opens_provider_circuit = False  # stop calling this provider until a cooldown passes
    may_have_billed_default = False

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        request_id: str | None = None,
        retry_after_s: float | None = None,
        may_have_billed: bool | None = None,
    ) -> None:
        self.http_status = http_status
        self.request_id = request_id
        self.retry_after_s = retry_after_s
        self.may_have_billed = (
            self.may_have_billed_default if may_have_billed is None else may_have_billed
        )
        super().__init__(message)


class RetryableError(ProviderError):
    """Transient: retry the same model with backoff, then move on."""

    code = "retryable"
    retryable = True


class RateLimited(RetryableError):
    """429 rate limit (honour retry-after)."""

    code = "rate_limited"


class Overloaded(RetryableError):
    """529 overloaded."""

    code = "overloaded"


class ServerError(RetryableError):
    """408, 500, 502, 503, 504."""

    code = "server_error"


class ProviderTimeout(RetryableError):
    """No answer within the timeout; the request was sent, so it may have been billed."""

    code = "timeout"
    may_have_billed_default = True


class ConnectionFailed(RetryableError):
    """The connection failed or dropped; billed only if the request had been sent."""

    code = "connection_error"


class AuthFailed(ProviderError):
    """401/403: the key is wrong or lacks permission; this provider is unusable for now."""

    code = "auth_error"
    next_provider_only = True
    opens_provider_circuit = True


class BillingExhausted(ProviderError):
    """402 or a quota 429: the account cannot pay; go to another provider for a long while."""

    code = "billing_error"
    next_provider_only = True
    opens_provider_circuit = True


class ModelUnavailable(ProviderError):
    """404 model not found or 501: next model, no retry."""

    code = "model_unavailable"


class ContextTooLong(ProviderError):
    """413 or a context-length 400: next model (maybe with a larger window), no retry."""

    code = "context_too_long"


class BadRequest(ProviderError):
    """Any other 400: the request itself is wrong for this provider; try another provider."""

    code = "bad_request"
    next_provider_only = True


class MalformedResponse(ProviderError):
    """A 200 whose body is not JSON or carries no usage: an error, and maybe billed."""

    code = "malformed_response"
    may_have_billed_default = True


class CircuitOpen(AgentdError):
    """Every model the run could use is cooling down after repeated failures."""


class Terminated(Exception):
    """SIGTERM stopped a command; what it was doing was cancelled and recorded.

    Not an `AgentdError`: like KeyboardInterrupt, it is an exit by signal (128 + 15), not a
    failure with one of the design's exit codes.
    """
