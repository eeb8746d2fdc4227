"""An OpenAI-compatible HTTP server (FastAPI + uvicorn) on the engine's continuous batcher.

    app       the scheduler thread, the endpoints, `create_app`
    protocol  OpenAI's request bodies, replies and stream chunks; the prompt encoder
    http      API key gate, body limit, request-head timeout, a draining uvicorn server
"""
from .app import COMPLETIONS_DEFAULT_MAX_TOKENS, Event, OpenAIServer, Scheduler, create_app, text_job
from .http import (BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, GRACEFUL_SHUTDOWN_S, REQUEST_HEAD_TIMEOUT_S,
                   SHUTDOWN_DRAIN_S, guarded_http_protocol, listen_socket, uvicorn_server)
from .protocol import APIError, ChatRequest, CompletionRequest, PromptEncoder

__all__ = ["APIError", "BODY_TIMEOUT_S", "COMPLETIONS_DEFAULT_MAX_TOKENS", "ChatRequest", "CompletionRequest",
           "DEFAULT_MAX_BODY_BYTES", "Event", "GRACEFUL_SHUTDOWN_S", "OpenAIServer", "PromptEncoder",
           "REQUEST_HEAD_TIMEOUT_S", "SHUTDOWN_DRAIN_S", "Scheduler", "create_app", "guarded_http_protocol",
           "listen_socket", "text_job", "uvicorn_server"]
