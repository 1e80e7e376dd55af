"""Form inputs that hand values to ``check_inputs`` untouched.

Gradio's own Number and Slider round values and check bounds with messages that do not
name the field ("Value 0 is less than minimum value 1."). ``validated_by_app`` keeps
Gradio's widget but leaves every check to the one validation the CLI and API share, so an
error always names the field and its range, and 2.5 images is refused rather than rounded.
(An instance override, not a subclass: Gradio writes a ``.pyi`` file beside every
component subclass it sees, which fails on a read-only install.)
"""

from __future__ import annotations

from typing import Any, TypeVar

import gradio as gr

NumericInput = TypeVar("NumericInput", gr.Number, gr.Slider)


def _pass_through(payload: Any) -> Any:
    return payload


def validated_by_app(component: NumericInput) -> NumericInput:
    """Make ``component`` pass its raw value to the handler, which validates it."""
    component.preprocess = _pass_through
    return component
