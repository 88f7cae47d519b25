"""Service layer: the API's logic between thin routes and the repositories (``app.queue``)."""


class ServiceError(Exception):
    """An error the API answers with ``status_code`` and ``{"detail": detail}``."""

    status_code = 400
    headers: dict[str, str] | None = None

    def __init__(self, detail):
        super().__init__(detail)
        self.detail = detail


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


class InvalidRequest(ServiceError):
    status_code = 422


class QuotaExceeded(ServiceError):
    status_code = 429
    headers = {"Retry-After": "30"}  # seconds; a queued job leaves the queue when a worker frees
