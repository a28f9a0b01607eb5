"""The server's errors, and the one mapping from an exception to what a caller and the metrics see.

Every error a request can end in is a `ServerError` carrying its HTTP status and fal's `error_type`. `answer_for`
turns any exception (a `ServerError`, a cancelled model call, or a fault outside the model) into an `ErrorAnswer`:
the status, the JSON body (fal's `{"detail": ...}`), the one-line message of the queue's `error` field, and the
`error_type`, which is also the `outcome` label of `flux2_jobs_total`. The HTTP handlers (server/http/errors.py),
the dispatcher and the metrics all call it, so a sync answer, a queued result and the counters agree.

No web framework is imported here: the service and the queue raise these without knowing about HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipelines import Cancelled

CANCELLED = "Request was cancelled"


@dataclass(frozen=True)
class ErrorAnswer:
    status: int
    error_type: str  # fal's error_type; also the `outcome` label of flux2_jobs_total
    body: dict  # the JSON body: {"detail": message}, or a pydantic-style list for bad input
    message: str  # one line: the queue status's `error` field
    headers: dict[str, str] = field(default_factory=dict)


class ServerError(Exception):
    """An error a request ends in: answered with `status` and a `{"detail": message}` body."""

    status = 500
    error_type = "internal_error"
    headers: dict[str, str] = {}  # noqa: RUF012 (read-only; subclasses set their own)

    def answer(self) -> ErrorAnswer:
        return ErrorAnswer(self.status, self.error_type, {"detail": str(self)}, str(self), dict(self.headers))


class InputError(ServerError):
    """A request field that passed schema validation but can't be used (an image URL that fails, say)."""

    def __init__(self, loc: list[str | int], msg: str, type_: str, input_value: object = None, status: int = 422):
        super().__init__(msg)
        self.status = status
        self.error_type = type_
        self.detail: dict = {"loc": ["body", *loc], "msg": msg, "type": type_}
        if input_value is not None:
            self.detail["input"] = input_value

    def answer(self) -> ErrorAnswer:
        return ErrorAnswer(self.status, self.error_type, {"detail": [self.detail]}, self.detail["msg"])


class InvalidBody(ServerError):
    """A queued body that fails the endpoint's schema, found when the request runs (as fal's queue validates):
    a 422 with the validation errors in FastAPI's shape, as the sync endpoint answers the same body at once."""

    status = 422
    error_type = "validation_error"

    def __init__(self, errors: list[dict]):
        self.errors = [{**error, "loc": ["body", *error["loc"]]} for error in errors]
        super().__init__(self.errors[0]["msg"] if self.errors else "Invalid body")

    def answer(self) -> ErrorAnswer:
        return ErrorAnswer(self.status, self.error_type, {"detail": self.errors}, str(self))


class Unavailable(ServerError):
    """This server can't serve the request as configured (a missing adapter, the model failed to load): a 503
    saying what is missing."""

    status = 503
    error_type = "unavailable"


class QueueUnavailable(Unavailable):
    """The shared queue (Redis) can't be reached for the moment: a 503 with Retry-After. Its address is not said
    (the log has it); the caller tries again, and a worker holds what it must record until the queue is back."""

    error_type = "queue_unavailable"

    def __init__(self, retry_after_s: int):
        super().__init__("The request queue is unreachable for the moment; try again shortly")
        self.headers = {"Retry-After": str(retry_after_s)}


class InsufficientStorage(ServerError):
    """Free space in the data directory is below FLUX2_MIN_FREE_DISK_BYTES: new uploads and requests are refused
    (507) so that the queue itself can still record what it runs."""

    status = 507
    error_type = "insufficient_storage"


class HostNotAllowed(ServerError):
    """Without API keys, a Host header that is not a name this server is served under (DNS rebinding)."""

    status = 400
    error_type = "host_not_allowed"


class OriginNotAllowed(ServerError):
    """Without API keys, a browser request from a page of another origin (and not a configured CORS origin)."""

    status = 403
    error_type = "origin_not_allowed"


class UploadAlreadyUsed(ServerError):
    """A one-time upload URL sent to again (or twice at once) after another call finished it."""

    status = 409
    error_type = "upload_already_used"

    def __init__(self, message: str = "This upload URL was already used; begin a new upload"):
        super().__init__(message)


class TooManyRequests(ServerError):
    """Over the caller's rate or concurrency limit: a 429 with Retry-After."""

    status = 429
    error_type = "too_many_requests"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class InferenceError(ServerError):
    """The model failed on a request that was valid: a 500 naming the cause."""

    status = 500
    error_type = "inference_error"

    def answer(self) -> ErrorAnswer:
        return ErrorAnswer(self.status, self.error_type, {"detail": f"Inference failed: {self}"}, str(self))


class OutOfMemory(InferenceError):
    """The device ran out of memory on this request; the memory was released and the next request can run."""

    error_type = "out_of_memory"


class JobTimedOut(InferenceError):
    """The job ran past FLUX2_JOB_TIMEOUT_S and was stopped at its next step."""

    status = 504
    error_type = "job_timeout"


class StepTimedOut(JobTimedOut):
    """One step of the job ran past FLUX2_STEP_TIMEOUT_S (a hung device or driver, a stalled disk): the job is
    failed without waiting for the step to return."""

    error_type = "step_timeout"


class RequestCancelled(ServerError):
    """The caller cancelled the request (queued: at once; running: at its next step)."""

    status = 400
    error_type = "request_cancelled"

    def __init__(self, message: str = CANCELLED):
        super().__init__(message)


class StartDeadlinePassed(ServerError):
    """The request's own X-Fal-Request-Timeout passed before it started."""

    status = 504
    error_type = "request_timeout"

    def __init__(self, message: str = "Request timed out before processing started (X-Fal-Request-Timeout)"):
        super().__init__(message)


class SyncWaitTimedOut(ServerError):
    """A sync call's result did not come within FLUX2_SYNC_TIMEOUT_S: its request was cancelled."""

    status = 504
    error_type = "request_timeout"

    def __init__(self, timeout_s: float):
        super().__init__(
            f"No result within {timeout_s:g} s (FLUX2_SYNC_TIMEOUT_S): the request was cancelled. Use the queue API "
            "(POST /queue/fal-ai/flux-2/...) for requests that may wait longer."
        )


class WorkerCrashed(ServerError):
    """The worker failed on this request (or died while running it) too many times; it is not retried."""

    status = 500
    error_type = "worker_crashed"


# The 5xx error_types that may well succeed if the same request is sent again (the device's memory was released; a
# fault outside the model; the queue back). Every 5xx answer says which it is in fal's `X-Fal-Retryable` header.
RETRYABLE = frozenset({"out_of_memory", "internal_error", "queue_unavailable"})


# The error_types that are the worker's failing, not the request's (its model, its storage, its configuration, a
# hung step): on a shared queue the request runs again on another worker, and a worker that fails this way many
# times in a row takes itself out of rotation (server/queue/breaker.py). Bad input, a cancel, running out of memory
# on a large request and the job's own time limit are the request's.
WORKERS_FAULTS = frozenset({"internal_error", "inference_error", "unavailable", "step_timeout"})


def retryable_headers(status: int, error_type: str | None) -> dict[str, str]:
    """`X-Fal-Retryable: true|false` on a 5xx answer (fal's header), nothing on any other."""
    return {"X-Fal-Retryable": str(error_type in RETRYABLE).lower()} if status >= 500 else {}


def answer_for(exc: BaseException) -> ErrorAnswer:
    """What a request that ended in `exc` answers, and how it is counted."""
    if isinstance(exc, ServerError):
        answer = exc.answer()
    elif isinstance(exc, Cancelled):
        answer = RequestCancelled().answer()
    else:
        cause = f"{type(exc).__name__}: {exc}"
        answer = ErrorAnswer(500, "internal_error", {"detail": f"Internal server error: {cause}"}, cause)
    answer.headers.update(retryable_headers(answer.status, answer.error_type))
    return answer


def outcome(exc: BaseException | None) -> str:
    """The `outcome` label of flux2_jobs_total: "ok", or the error's fal error_type."""
    return "ok" if exc is None else answer_for(exc).error_type


def workers_fault(exc: BaseException) -> bool:
    """Whether a request that ended in `exc` failed because of the worker that ran it (WORKERS_FAULTS)."""
    return answer_for(exc).error_type in WORKERS_FAULTS
