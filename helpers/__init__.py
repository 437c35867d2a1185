"""Helpers for the align-llama tutorial: everything the notebooks call, one topic per module.

Importing the package imports Unsloth first when the environment selects it (TUTORIAL_BACKEND), because
Unsloth must patch transformers, peft and trl before any of them is imported.
"""

from helpers.config import import_selected_backend

import_selected_backend()
