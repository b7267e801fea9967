"""``nanoshard api``: a gateway that speaks OpenAI's HTTP API and shows the swarm live.

A client of the swarm like any other (the SDK's ``AsyncClient``; no weights): ``app.py``
answers ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``, ``/metrics`` and the
web view at ``/``; ``server.py`` runs it on uvicorn. What a request may say and what an
answer looks like is pure policy in ``protocol.py``; streamed text in the core's
``nanoshard/textstream.py``.
"""
