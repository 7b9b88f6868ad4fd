"""The one error of the tritonserver launcher."""


class ServerError(RuntimeError):
    """A tritonserver that could not start, load its model, or become ready."""
