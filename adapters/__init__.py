"""The adapter artifact: reading, validating, storing and merging PEFT adapters.

Shared by the server and the trainer; knows nothing of HTTP, scheduling or serving.
"""
