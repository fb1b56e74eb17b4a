"""The OpenAI-compatible server: ``tachyon serve`` (see ``server.py``)."""
