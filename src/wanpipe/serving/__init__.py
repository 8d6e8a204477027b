"""``wanpipe serve``: a video generation server (OpenAI Videos API, Open Responses, a web page).

parsing.py   request parsing and validation, OpenAI-style errors (the HTTP edge, inbound)
schemas.py   the response bodies: pydantic models (the HTTP edge, outbound)
jobs.py      the SQLite job store, the bounded queue and the worker that owns the model
app.py       the FastAPI routes and the web page (static/index.html)
cli.py       ``add_serve_parser`` / ``cmd_serve`` (``wanpipe serve``); ``python -m wanpipe.serving``

Nothing is imported here, so ``wanpipe --help`` does not load FastAPI.
"""
