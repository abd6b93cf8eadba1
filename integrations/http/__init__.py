"""`rollout serve`: SGLang's native HTTP API (what slime and SGLang's router call) and the
OpenAI API, over the public `Engine` API."""

from integrations.http.app import build_app

__all__ = ["build_app"]
