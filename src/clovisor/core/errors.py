"""The core's single error root."""


class CoreError(Exception):
    """Anything the core rejects; packets never raise anything else."""


class ProtocolError(CoreError):
    """Bytes that are not the protocol the flow was configured for."""
