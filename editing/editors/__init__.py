"""Editors: one module per method, all subclasses of `editing.editors.base.Editor`."""
from editing.editors.base import CheckpointMismatchError, EditError, Editor
from editing.editors.ft import FT
from editing.editors.noedit import NoEdit

__all__ = ["Editor", "EditError", "CheckpointMismatchError", "FT", "NoEdit"]
