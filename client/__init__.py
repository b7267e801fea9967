"""The client side of nanoshard: the SDK (``Client``, ``AsyncClient``), route sessions with
failover, and the coordinator client."""

from nanoshard.errors import NanoshardError

from .sdk import AsyncChatSession, AsyncClient, ChatSession, Client, GenerationResult, Token
from .session import RetryPolicy

__all__ = [
    "AsyncChatSession",
    "AsyncClient",
    "ChatSession",
    "Client",
    "GenerationResult",
    "NanoshardError",
    "RetryPolicy",
    "Token",
]
