"""Thin HTTP signaling for the voice agent: page, ICE config, offer/answer, session registry,
limits, auth and observability. Session tokens live in `signaling.tokens`."""

from signaling.app import (
    AUDIT_KEY,
    CONFIG_KEY,
    ENGINE_KEY,
    RATE_LIMITER_KEY,
    REGISTRY_KEY,
    create_app,
    json_error,
    peer_address,
)
from signaling.auth import AuthConfig
from signaling.config import IceServer, ServerConfig, ice_servers_from_urls
from signaling.registry import Connection, ConnectionRegistry, Supervision

__all__ = [
    "AUDIT_KEY",
    "CONFIG_KEY",
    "ENGINE_KEY",
    "RATE_LIMITER_KEY",
    "REGISTRY_KEY",
    "AuthConfig",
    "Connection",
    "ConnectionRegistry",
    "IceServer",
    "ServerConfig",
    "Supervision",
    "create_app",
    "ice_servers_from_urls",
    "json_error",
    "peer_address",
]
