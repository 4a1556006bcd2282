"""`agentcache serve`: OpenAI- and Anthropic-compatible HTTP API where every
agent keeps its own persistent KV cache. See docs/server.md.

    app.py            routes, API key and body-size gate, model loading
    openai_api.py     /v1/chat/completions, /v1/completions
    anthropic_api.py  /v1/messages, /v1/messages/count_tokens
    responses_api.py  /v1/responses
    conversation.py   both APIs' messages and tools for the chat template
    state.py          agent selection, rate limits, turns bridged to asyncio
    metrics.py        /metrics in Prometheus text
    saves.py          unsaved agents: reported, retried with backoff, written at a stop
    connections.py    bounds that need no key: connections, header time, log repeats
"""

from __future__ import annotations

from .state import ServerConfig


def create_app(config: ServerConfig | None = None, load: bool = True):
    from .app import create_app as make

    return make(config, load)


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the server until interrupted; the model loads after the socket is bound.
    Connections, header time, header size and repeated log lines are bounded
    (connections.py)."""
    import uvicorn

    from .connections import connection_bound, guarded_protocol, quiet_repeats

    config.host = host
    app = create_app(config)
    protocol = guarded_protocol(connection_bound(config.max_connections), config.header_timeout, app.state.metrics)
    quiet_repeats()
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10, http=protocol,
                timeout_keep_alive=5, h11_max_incomplete_event_size=64 << 10)


__all__ = ["ServerConfig", "create_app", "serve"]
