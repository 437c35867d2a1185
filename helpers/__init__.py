"""Helpers for the align-llama tutorial: everything the notebooks call, one topic per module.

Importing the package imports nothing heavy; the modules that use transformers, peft or trl import
`helpers.backend` first, which imports Unsloth when it is the selected backend (it must patch them first).
"""
