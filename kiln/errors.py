"""The project's exception hierarchy: every error a user can cause is a KilnError with a clear message."""


class KilnError(Exception):
    """Base class: the message is meant for a user, and the CLI prints it without a traceback."""


class WeightsError(KilnError):
    """Weights could not be found or loaded (missing file, no network for a hub id, wrong architecture)."""


class ExportError(KilnError):
    """An export or conversion step failed."""


class ParityError(KilnError):
    """An artifact differs from the PyTorch reference by more than its tolerance."""


class ConfigError(KilnError):
    """A model configuration is inconsistent."""


class ServerError(KilnError):
    """The Triton server could not be started, or a model failed to load."""


class Unreachable(ServerError):
    """gRPC made no connection to Triton for a call (Triton down, or this channel waiting to connect again): the call
    never reached it, so it may be sent again."""


# what gRPC and tritonclient say where no connection was made
_UNREACHABLE = ("failed to connect", "connection refused", "connect failed", "connections to all backends failing")


def is_unreachable(message: str) -> bool:
    """Whether an error's message says that no connection to the server was made."""
    return any(marker in message.lower() for marker in _UNREACHABLE)


class InputError(KilnError):
    """A request carried input that cannot be processed (corrupt image, bad shape, out of range)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type's name), for a one-line error built on a library's."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


class TooLargeError(InputError):
    """An input is over a size limit (a prompt's length, an image's pixels): HTTP 413."""


class NotFoundError(InputError):
    """A request names something this server does not have (a sampler, a model): HTTP 404."""
