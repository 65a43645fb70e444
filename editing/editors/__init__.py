"""Editors: one module per method, all subclasses of `editing.editors.base.Editor`."""
from editing.editors.adaple import AdaPLE
from editing.editors.alphaedit import AlphaEdit
from editing.editors.base import CheckpointMismatchError, EditError, Editor
from editing.editors.comeba import COMEBA
from editing.editors.emmet import EMMET
from editing.editors.ft import FT
from editing.editors.grace import GRACE
from editing.editors.ireva import IReVa
from editing.editors.jeep import JEEP
from editing.editors.lora import LoRA
from editing.editors.malmen import MALMEN
from editing.editors.melo import MELO
from editing.editors.memit import MEMIT
from editing.editors.mend import MEND
from editing.editors.noedit import NoEdit
from editing.editors.pmet import PMET
from editing.editors.rome import ROME
from editing.editors.serac import SERAC

__all__ = ["AdaPLE", "AlphaEdit", "EMMET", "Editor", "EditError", "CheckpointMismatchError", "FT", "GRACE", "IReVa", "JEEP", "LoRA", "NoEdit", "ROME", "SERAC", "MALMEN", "MELO", "MEMIT", "MEND", "PMET", "COMEBA"]
