"""Worked examples: tasks, model and data builders that use the library but are not part of it."""
