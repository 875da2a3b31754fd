"""Framework integrations: thin adapters over the public API.

``whisperr_durable.integrations.django``, ``.flask``, ``.asgi`` (Starlette and FastAPI) and
``.serverless``. Each imports its framework only when it is itself imported; importing
``whisperr_durable`` or this package imports no framework.
"""

from ._common import BoundWhisperr, client_from_settings, resolve_user_id

__all__ = ["BoundWhisperr", "client_from_settings", "resolve_user_id"]
