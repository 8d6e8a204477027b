"""``wanpipe serve``: a video generation server (OpenAI Videos API, Open Responses, a web page).

parsing.py   request parsing and validation, OpenAI-style errors (the HTTP edge, inbound)
schemas.py   the response bodies: pydantic models (the HTTP edge, outbound)
store.py     the SQLite job store: jobs, their videos and input images, recovery after a restart
manager.py   the bounded queue and the worker thread that owns the model (JobManager)
metrics.py   the counters behind /metrics
app.py       the FastAPI routes and the web page (static/index.html)
cli.py       ``add_serve_parser`` / ``cmd_serve`` (``wanpipe serve``); ``python -m wanpipe.serving``

Nothing is imported here, so ``wanpipe --help`` does not load FastAPI.
"""
