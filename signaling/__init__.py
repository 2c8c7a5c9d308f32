"""Thin HTTP signaling for the voice agent: page, ICE config, offer/answer, session registry."""

from signaling.app import CONFIG_KEY, ENGINE_KEY, REGISTRY_KEY, create_app, json_error
from signaling.config import IceServer, ServerConfig, ice_servers_from_urls
from signaling.registry import Connection, ConnectionRegistry

__all__ = [
    "CONFIG_KEY",
    "ENGINE_KEY",
    "REGISTRY_KEY",
    "Connection",
    "ConnectionRegistry",
    "IceServer",
    "ServerConfig",
    "create_app",
    "ice_servers_from_urls",
    "json_error",
]
