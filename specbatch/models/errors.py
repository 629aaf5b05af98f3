"""CheckpointError: kept in its own module so path resolution never needs to import torch."""


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupt or of an unsupported kind.

    The message is one line naming the file (and field or tensor) and what was expected.
    """
