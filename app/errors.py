"""How every app handler reports a failure: a readable message in the page, never a stack trace."""

from __future__ import annotations

import functools
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402


def friendly(fn):
    """Show any error as a readable message in the page (never a stack trace); the server keeps serving."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a message
            raise gr.Error(f"{type(e).__name__}: {e}") from None

    return wrapper
