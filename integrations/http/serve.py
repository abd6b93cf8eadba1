"""`rollout serve`: the engine behind uvicorn."""

import logging

from rollout import Engine


def serve(engine: Engine, host: str, port: int, api_key: str | None = None,
          model_name: str | None = None, log_level: str = "info") -> None:
    """Serve until interrupted. Binds `host` only (loopback unless told otherwise)."""
    import uvicorn

    from integrations.http.app import build_app
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    app = build_app(engine, model_name=model_name, api_key=api_key)
    try:
        uvicorn.run(app, host=host, port=port, access_log=False, log_level=log_level)
    finally:
        engine.shutdown()
