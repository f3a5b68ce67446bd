"""Chat datasets as lists of conversations (see tasks/common.py for the format and the Task class)."""
