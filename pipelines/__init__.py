"""Variant profiles -> diffusers' Flux2Pipeline."""

from pipelines.editor import Cancelled, EditCall, EditResult, Flux2Editor, load_editor
from pipelines.profiles import PROFILES, Profile

__all__ = ["PROFILES", "Cancelled", "EditCall", "EditResult", "Flux2Editor", "Profile", "load_editor"]
